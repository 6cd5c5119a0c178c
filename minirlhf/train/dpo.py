"""DPO: the shortcut that replaces steps 2 and 3 (reward model and RL) with one classification loss.

The KL-regularised optimum is p*(y|x) ∝ p_ref(y|x)·exp(R(y|x)/β), so R = β·log(p*/p_ref) + const(x).
Put that implicit reward into the Bradley-Terry likelihood of the preferences, and train p_θ directly:

    L_DPO(θ) = -E log σ(β·log(p_θ(y_w|x)/p_ref(y_w|x)) - β·log(p_θ(y_l|x)/p_ref(y_l|x)))

(`minirlhf.losses.dpo_loss`). p_ref is the frozen starting policy; its log-prob of each chosen and
rejected completion is computed once, when a batch first needs it (`ReferenceLogps`).
"""

from dataclasses import dataclass

import numpy as np

from ..checkpoint import tokenizer_for
from ..datasets import Minibatches, collate, load_preferences
from ..logprobs import sequence_logprobs
from ..losses import dpo_loss
from ..optim import AdamW, lr_schedule, param_groups
from ..tensor import no_grad
from .common import (batch_tensor, check_common, config_summary, distinct_pairs, encode_sequences,
                     load_policy, option, overwrite_option, require, split_holdout, weighted_means)
from .run import Run


@dataclass
class DPOConfig:
    data: str = option("", "JSONL of {\"prompt\", \"chosen\", \"rejected\"} records", required=True)
    init: str = option("runs/sft/ckpt.npz", "the policy to start from; also the frozen reference p_ref")
    out_dir: str = option("runs/dpo", "where metrics.jsonl and ckpt.npz go")
    beta: float = option(0.1, "β: the strength of the implicit KL penalty")
    loss_type: str = option("sigmoid", "sigmoid (DPO) or ipo", choices=["sigmoid", "ipo"])
    label_smoothing: float = option(0.0, "cDPO: the assumed rate of flipped labels, in [0, 0.5]")
    batch_size: int = option(16, "pairs per step")
    max_steps: int = option(200, "optimisation steps")
    lr: float = option(1e-4, "peak learning rate")
    warmup_steps: int = option(10, "steps of linear warm-up, then cosine decay to lr/10")
    grad_clip: float = option(1.0, "clip the global gradient norm (0: no clipping)")
    val_fraction: float = option(0.1, "share of the pairs held out to report val metrics")
    eval_interval: int = option(50, "held-out metrics every N steps")
    ckpt_interval: int = option(50, "write a checkpoint every N steps (and at the end)")
    seed: int = option(0, "seed of the batches")
    overwrite: bool = overwrite_option()
    device: str = option("cpu", "cpu (NumPy) or cuda (CuPy)", choices=["cpu", "cuda"])
    quiet: bool = option(False, "no progress bar or messages")


def pair_logps(model, pairs, device):
    """log p(y_w|x) and log p(y_l|x) (each (B,)) of a batch of (chosen row, rejected row) pairs."""
    batch = collate([c for c, _ in pairs] + [r for _, r in pairs])
    _, logp = sequence_logprobs(model, batch_tensor(batch["input_ids"], device),
                                batch_tensor(batch["completion_mask"], device))     # (2B,)
    B = len(pairs)
    return logp[:B], logp[B:]


class ReferenceLogps:
    """log p_ref of the chosen and rejected completion of each pair, computed when a batch first needs
    them and kept. Pairs are scored in fixed chunks of ``batch_size`` (pairs 0..B-1, B..2B-1, ...), so
    a value never depends on which batch asked first: a resumed run reads the same numbers."""

    def __init__(self, ref, pairs, cfg):
        self.ref, self.pairs, self.cfg = ref, pairs, cfg
        self.chosen = np.full(len(pairs), np.nan)                          # (N,)
        self.rejected = np.full(len(pairs), np.nan)                        # (N,)

    def __call__(self, idx):
        """(chosen, rejected): two host arrays (len(idx),) for the pair indices ``idx``."""
        B = self.cfg.batch_size
        for chunk in sorted({i // B for i in idx.tolist() if np.isnan(self.chosen[i])}):
            lo, hi = chunk * B, min((chunk + 1) * B, len(self.pairs))
            with no_grad():
                c, r = pair_logps(self.ref, self.pairs[lo:hi], self.cfg.device)
            self.chosen[lo:hi], self.rejected[lo:hi] = c.numpy(), r.numpy()
        return self.chosen[idx], self.rejected[idx]


def dpo(cfg):
    """Train a policy with DPO on preference pairs; returns {"checkpoint", metrics...}.

    Running it again with the same ``out_dir`` goes on from the last checkpoint (`Run`).
    """
    check_common(cfg)
    require(0 <= cfg.label_smoothing <= 0.5, f"label_smoothing must be in [0, 0.5], got {cfg.label_smoothing}")
    with Run(cfg, "dpo") as run:
        return run.result if run.finished else _train(cfg, run)


def _train(cfg, run):
    records = distinct_pairs(load_preferences(cfg.data), cfg.data, run.print)
    tokenizer = tokenizer_for(cfg.init)   # the one the model was trained with
    policy = load_policy(cfg.init, cfg.device)
    block = policy.config.block_size
    pairs = list(zip(encode_sequences(records, tokenizer, block, "chosen", cfg.data),
                     encode_sequences(records, tokenizer, block, "rejected", cfg.data)))
    train_idx, val_idx = split_holdout(range(len(pairs)), cfg.val_fraction, np.random.default_rng(cfg.seed))

    ref = load_policy(cfg.init, cfg.device)
    ref.eval()
    ref_logps = ReferenceLogps(ref, pairs, cfg)

    def loss_of(idx):
        idx = np.asarray(idx)
        pi_c, pi_r = pair_logps(policy, [pairs[i] for i in idx.tolist()], cfg.device)
        ref_c, ref_r = ref_logps(idx)                                      # (B,), (B,)
        return dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=cfg.beta,
                        label_smoothing=cfg.label_smoothing, loss_type=cfg.loss_type)

    def evaluate():
        policy.eval()
        batches = [val_idx[i:i + cfg.batch_size] for i in range(0, len(val_idx), cfg.batch_size)]
        with no_grad():
            results = [loss_of(batch) for batch in batches]
        policy.train()
        return weighted_means([{"loss": loss.item(), **m} for loss, m in results],
                              [len(b) for b in batches])

    optimizer = AdamW(param_groups(policy, 0.0), lr=cfg.lr)
    start = run.restore(policy, optimizer)
    run.print(f"dpo: {len(train_idx)} training and {len(val_idx)} held-out pairs from {cfg.data}\n"
              f"{config_summary(cfg)}")
    batches = Minibatches(train_idx, cfg.batch_size, seed=cfg.seed)
    val = {k[4:]: v for k, v in run.last.items() if k.startswith("val_")}
    for step in run.steps(start):
        optimizer.lr = lr_schedule(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.lr / 10)
        loss_t, metrics = loss_of(batches[step - 1])
        loss, grad_norm = run.update(loss_t)
        row = {"loss": loss, **metrics, "lr": optimizer.lr, "grad_norm": grad_norm}
        if val_idx and (step % cfg.eval_interval == 0 or step == cfg.max_steps):
            val = evaluate()
            row.update({f"val_{k}": v for k, v in val.items()})
        run.log(step, row)
        run.save_if_due(step)
    last = {k: v for k, v in run.last.items() if k not in ("step", "time") and not k.startswith("val_")}
    return run.finish({**last, "val": val}, f"loss {last['loss']:.4f}, reward accuracy "
                                            f"{last['rewards/accuracies']:.3f}")
