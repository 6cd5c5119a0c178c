"""Step 1 of the lecture: supervised fine-tuning on demonstrations.

Given pairs (x, y) of a prompt and a good completion, maximise the likelihood of the completion only:

    L_SFT(θ) = -(1/N) Σ_{(x,y)} Σ_t log p_θ(y_t | x, y_<t)        (N = number of completion tokens)

The prompt is context, never a target (`minirlhf.losses.sft_loss` masks it).
"""

from dataclasses import dataclass

import numpy as np

from ..checkpoint import tokenizer_for
from ..datasets import Minibatches, collate, load_sft
from ..losses import sft_loss
from ..optim import AdamW, lr_schedule, param_groups
from ..tensor import no_grad
from .common import (batch_tensor, check_common, config_summary, encode_sequences, load_policy, option,
                     overwrite_option, split_holdout)
from .run import Run


@dataclass
class SFTConfig:
    data: str = option("", "JSONL of {\"prompt\", \"completion\"} records", required=True)
    init: str = option("runs/pretrain/ckpt.npz", "the GPT checkpoint to start from")
    out_dir: str = option("runs/sft", "where metrics.jsonl and ckpt.npz go")
    batch_size: int = option(16, "examples per step")
    max_steps: int = option(300, "optimisation steps")
    lr: float = option(5e-4, "peak learning rate")
    warmup_steps: int = option(20, "steps of linear warm-up, then cosine decay to lr/10")
    weight_decay: float = option(0.0, "AdamW's decoupled weight decay")
    grad_clip: float = option(1.0, "clip the global gradient norm (0: no clipping)")
    val_fraction: float = option(0.05, "share of the examples held out to report val_loss")
    eval_interval: int = option(100, "held-out loss every N steps")
    ckpt_interval: int = option(100, "write a checkpoint every N steps (and at the end)")
    seed: int = option(0, "seed of the batches")
    overwrite: bool = overwrite_option()
    device: str = option("cpu", "cpu (NumPy) or cuda (CuPy)", choices=["cpu", "cuda"])
    quiet: bool = option(False, "no progress bar or messages")


def batch_loss(model, batch, device):
    input_ids = batch_tensor(batch["input_ids"], device)                 # (B, T)
    logits = model(input_ids)                                            # (B, T, V)
    return sft_loss(logits, input_ids, batch_tensor(batch["completion_mask"], device))


def evaluate(model, seqs, cfg):
    if not seqs:
        return None
    model.eval()
    batches = [collate(seqs[i:i + cfg.batch_size]) for i in range(0, len(seqs), cfg.batch_size)]
    with no_grad():
        losses = [batch_loss(model, batch, cfg.device).item() for batch in batches]
    model.train()
    # the mean over all completion tokens: weight each batch's mean by its number of tokens
    tokens = [batch["completion_mask"][:, 1:].sum() for batch in batches]
    return float(np.average(losses, weights=tokens))


def sft(cfg):
    """Fine-tune a GPT on prompt/completion pairs; returns {"checkpoint", "loss", "val_loss", ...}.

    Running it again with the same ``out_dir`` goes on from the last checkpoint (`Run`).
    """
    check_common(cfg)
    with Run(cfg, "sft") as run:
        return run.result if run.finished else _train(cfg, run)


def _train(cfg, run):
    records = load_sft(cfg.data)
    tokenizer = tokenizer_for(cfg.init)   # the one the model was trained with
    model = load_policy(cfg.init, cfg.device)
    seqs = encode_sequences(records, tokenizer, model.config.block_size, "completion", cfg.data)
    train_seqs, val_seqs = split_holdout(seqs, cfg.val_fraction, np.random.default_rng(cfg.seed))

    optimizer = AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    start = run.restore(model, optimizer)
    run.print(f"sft: {len(train_seqs)} training and {len(val_seqs)} held-out examples from "
              f"{cfg.data}\n{config_summary(cfg)}")
    batches = Minibatches(train_seqs, cfg.batch_size, seed=cfg.seed)
    val_loss = run.last.get("val_loss")
    for step in run.steps(start):
        optimizer.lr = lr_schedule(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.lr / 10)
        loss, grad_norm = run.update(batch_loss(model, collate(batches[step - 1]), cfg.device))
        metrics = {"loss": loss, "lr": optimizer.lr, "grad_norm": grad_norm}
        if val_seqs and (step % cfg.eval_interval == 0 or step == cfg.max_steps):
            val_loss = metrics["val_loss"] = evaluate(model, val_seqs, cfg)
        run.log(step, metrics)
        run.save_if_due(step)
    loss = run.last.get("loss")
    return run.finish({"loss": loss, "val_loss": val_loss},
                      f"loss {loss:.4f}" + (f", held-out loss {val_loss:.4f}" if val_loss else ""))
