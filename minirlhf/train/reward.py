"""Step 2 of the lecture: learn a reward model from human preferences (Bradley-Terry).

People compare two completions of a prompt; the Bradley-Terry model says y_w is preferred to y_l
with probability σ(r(x, y_w) - r(x, y_l)). Maximum likelihood of the observed choices:

    L_BT(φ) = -E_{(x, y_w, y_l)} log σ(r_φ(x, y_w) - r_φ(x, y_l))

r_φ is the pretrained (or SFT) GPT trunk with a scalar head, read at the last token of x + y.
Rewards are only defined up to a constant per prompt: only differences are ever observed.
"""

from dataclasses import dataclass

import numpy as np

from ..checkpoint import tokenizer_for
from ..datasets import Minibatches, collate, load_preferences
from ..losses import bt_loss
from ..model import RewardModel
from ..optim import AdamW, lr_schedule, param_groups
from ..tensor import no_grad
from .common import (batch_tensor, check_common, config_summary, distinct_pairs, encode_sequences,
                     load_policy, option, overwrite_option, split_holdout, weighted_means)
from .run import Run


@dataclass
class RewardConfig:
    data: str = option("", "JSONL of {\"prompt\", \"chosen\", \"rejected\"} records", required=True)
    init: str = option("runs/pretrain/ckpt.npz",
                       "the GPT checkpoint whose trunk starts the reward model")
    out_dir: str = option("runs/reward", "where metrics.jsonl and ckpt.npz go")
    batch_size: int = option(16, "pairs per step")
    max_steps: int = option(300, "optimisation steps")
    lr: float = option(3e-4, "peak learning rate")
    warmup_steps: int = option(20, "steps of linear warm-up, then cosine decay to lr/10")
    weight_decay: float = option(0.0, "AdamW's decoupled weight decay")
    grad_clip: float = option(1.0, "clip the global gradient norm (0: no clipping)")
    margin: float = option(0.0, "ask r(chosen) - r(rejected) to exceed this margin")
    val_fraction: float = option(0.1, "share of the pairs held out to report val accuracy")
    eval_interval: int = option(100, "held-out accuracy every N steps")
    ckpt_interval: int = option(100, "write a checkpoint every N steps (and at the end)")
    seed: int = option(0, "seed of the head and the batches")
    overwrite: bool = overwrite_option()
    device: str = option("cpu", "cpu (NumPy) or cuda (CuPy)", choices=["cpu", "cuda"])
    quiet: bool = option(False, "no progress bar or messages")


def score(rm, seqs, device):
    """Rewards (B,) of ``(ids, n_prompt)`` sequences: the head read at each sequence's last real token."""
    batch = collate(seqs)
    return rm(batch_tensor(batch["input_ids"], device), batch["lengths"])


def pair_loss(rm, pairs, cfg):
    """Bradley-Terry loss of a batch of (chosen row, rejected row) pairs, scored in one pass."""
    rewards = score(rm, [c for c, _ in pairs] + [r for _, r in pairs], cfg.device)   # (2B,)
    B = len(pairs)
    return bt_loss(rewards[:B], rewards[B:], margin=cfg.margin)


def evaluate(rm, pairs, cfg):
    rm.eval()
    batches = [pairs[i:i + cfg.batch_size] for i in range(0, len(pairs), cfg.batch_size)]
    with no_grad():
        results = [pair_loss(rm, batch, cfg) for batch in batches]
    rm.train()
    return weighted_means([{"loss": loss.item(), **m} for loss, m in results], [len(b) for b in batches])


def reward(cfg):
    """Train a reward model on preference pairs; returns {"checkpoint", "val_accuracy", ...}.

    Running it again with the same ``out_dir`` goes on from the last checkpoint (`Run`).
    """
    check_common(cfg)
    with Run(cfg, "reward") as run:
        return run.result if run.finished else _train(cfg, run)


def _train(cfg, run):
    records = distinct_pairs(load_preferences(cfg.data), cfg.data, run.print)
    tokenizer = tokenizer_for(cfg.init)   # the one the model was trained with
    gpt = load_policy(cfg.init, cfg.device)
    block = gpt.config.block_size
    pairs = list(zip(encode_sequences(records, tokenizer, block, "chosen", cfg.data),
                     encode_sequences(records, tokenizer, block, "rejected", cfg.data)))
    train_pairs, val_pairs = split_holdout(pairs, cfg.val_fraction, np.random.default_rng(cfg.seed))
    rm = RewardModel.from_gpt(gpt, seed=cfg.seed)
    del gpt

    optimizer = AdamW(param_groups(rm, cfg.weight_decay), lr=cfg.lr)
    start = run.restore(rm, optimizer)
    run.print(f"reward: {len(train_pairs)} training and {len(val_pairs)} held-out pairs from "
              f"{cfg.data}\n{config_summary(cfg)}")
    batches = Minibatches(train_pairs, cfg.batch_size, seed=cfg.seed)
    val = {k[4:]: v for k, v in run.last.items() if k.startswith("val_")}
    for step in run.steps(start):
        optimizer.lr = lr_schedule(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.lr / 10)
        loss_t, metrics = pair_loss(rm, batches[step - 1], cfg)
        loss, grad_norm = run.update(loss_t)
        metrics = {"loss": loss, **metrics, "lr": optimizer.lr, "grad_norm": grad_norm}
        if val_pairs and (step % cfg.eval_interval == 0 or step == cfg.max_steps):
            val = evaluate(rm, val_pairs, cfg)
            metrics.update({f"val_{k}": v for k, v in val.items()})
        run.log(step, metrics)
        run.save_if_due(step)
    summary = (f"held-out accuracy {val['accuracy']:.3f}, margin {val['margin']:.3f}"
               if val.get("accuracy") is not None else f"loss {run.last.get('loss'):.4f}")
    return run.finish({"val_accuracy": val.get("accuracy"), "val_loss": val.get("loss")}, summary)
