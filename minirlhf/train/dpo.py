"""DPO: the shortcut that replaces steps 2 and 3 (reward model and RL) with one classification loss.

The KL-regularised optimum is p*(y|x) ∝ p_ref(y|x)·exp(R(y|x)/β), so R = β·log(p*/p_ref) + const(x).
Put that implicit reward into the Bradley-Terry likelihood of the preferences, and train p_θ directly:

    L_DPO(θ) = -E log σ(β·log(p_θ(y_w|x)/p_ref(y_w|x)) - β·log(p_θ(y_l|x)/p_ref(y_l|x)))

(`minirlhf.losses.dpo_loss`). p_ref is the frozen starting policy; its log-probs of every chosen and
rejected completion are computed once, before training.
"""

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..checkpoint import save_checkpoint, tokenizer_for
from ..datasets import collate, iterate_minibatches, load_preferences
from ..logprobs import sequence_logprobs
from ..losses import dpo_loss
from ..optim import AdamW, lr_schedule, param_groups
from ..tensor import no_grad
from .common import (RunLog, batch_tensor, check_common, config_summary, encode_rows, load_policy,
                     opt, optimise, require, split_holdout, weighted_means)


@dataclass
class DPOConfig:
    data: str = opt("", "JSONL of {\"prompt\", \"chosen\", \"rejected\"} records", required=True)
    init: str = opt("runs/sft/ckpt.npz", "the policy to start from; also the frozen reference p_ref")
    out_dir: str = opt("runs/dpo", "where metrics.jsonl and ckpt.npz go")
    beta: float = opt(0.1, "β: the strength of the implicit KL penalty")
    loss_type: str = opt("sigmoid", "sigmoid (DPO) or ipo", choices=["sigmoid", "ipo"])
    label_smoothing: float = opt(0.0, "cDPO: the assumed rate of flipped labels, in [0, 0.5]")
    batch_size: int = opt(16, "pairs per step")
    max_steps: int = opt(200, "optimisation steps")
    lr: float = opt(1e-4, "peak learning rate")
    warmup_steps: int = opt(10, "steps of linear warm-up, then cosine decay to lr/10")
    grad_clip: float = opt(1.0, "clip the global gradient norm (0: no clipping)")
    val_fraction: float = opt(0.1, "share of the pairs held out to report val metrics")
    eval_interval: int = opt(50, "held-out metrics every N steps")
    seed: int = opt(0, "seed of the batches")
    device: str = opt("cpu", "cpu (NumPy) or cuda (CuPy)", choices=["cpu", "cuda"])
    quiet: bool = opt(False, "no progress bar or messages")


def pair_logps(model, pairs, device):
    """log p(y_w|x) and log p(y_l|x) (each (B,)) of a batch of (chosen row, rejected row) pairs."""
    batch = collate([c for c, _ in pairs] + [r for _, r in pairs])
    _, logp = sequence_logprobs(model, batch_tensor(batch["input_ids"], device),
                                batch_tensor(batch["completion_mask"], device))     # (2B,)
    B = len(pairs)
    return logp[:B], logp[B:]


def reference_logps(ref, pairs, cfg):
    """log p_ref of every chosen and rejected completion, computed once: two host arrays (N,)."""
    chosen, rejected = [], []
    with no_grad():
        for i in range(0, len(pairs), cfg.batch_size):
            c, r = pair_logps(ref, pairs[i:i + cfg.batch_size], cfg.device)
            chosen.append(c.numpy())
            rejected.append(r.numpy())
    return np.concatenate(chosen), np.concatenate(rejected)


def dpo(cfg):
    """Train a policy with DPO on preference pairs; returns {"checkpoint", metrics...}."""
    check_common(cfg)
    require(0 <= cfg.label_smoothing <= 0.5, f"label_smoothing must be in [0, 0.5], got {cfg.label_smoothing}")
    tokenizer = tokenizer_for(cfg.init)   # the one the model was trained with
    records = load_preferences(cfg.data)
    policy = load_policy(cfg.init, cfg.device)
    block = policy.config.block_size
    pairs = list(zip(encode_rows(records, tokenizer, block, "chosen", cfg.data),
                     encode_rows(records, tokenizer, block, "rejected", cfg.data)))
    rng = np.random.default_rng(cfg.seed)
    train_idx, val_idx = split_holdout(range(len(pairs)), cfg.val_fraction, rng)

    ref = load_policy(cfg.init, cfg.device)
    ref.eval()
    ref_chosen, ref_rejected = reference_logps(ref, pairs, cfg)            # (N,), (N,)
    del ref

    def loss_of(idx):
        idx = np.asarray(idx)
        pi_c, pi_r = pair_logps(policy, [pairs[i] for i in idx.tolist()], cfg.device)
        return dpo_loss(pi_c, pi_r, ref_chosen[idx], ref_rejected[idx], beta=cfg.beta,
                        label_smoothing=cfg.label_smoothing, loss_type=cfg.loss_type)

    def evaluate():
        policy.eval()
        batches = [val_idx[i:i + cfg.batch_size] for i in range(0, len(val_idx), cfg.batch_size)]
        with no_grad():
            rows = [loss_of(batch) for batch in batches]
        policy.train()
        return weighted_means([{"loss": loss.item(), **m} for loss, m in rows],
                              [len(b) for b in batches])

    optimizer = AdamW(param_groups(policy, 0.0), lr=cfg.lr)
    log = RunLog(cfg.out_dir, cfg.max_steps, "dpo", quiet=cfg.quiet)
    log.print(f"dpo: {len(train_idx)} training and {len(val_idx)} held-out pairs from {cfg.data}\n"
              f"{config_summary(cfg)}")
    batches = iterate_minibatches(train_idx, cfg.batch_size, rng, epochs=None)
    t0, last, val = time.time(), {}, {}
    for step in range(1, cfg.max_steps + 1):
        optimizer.lr = lr_schedule(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.lr / 10)
        loss, metrics = loss_of(next(batches))
        optimise(policy, optimizer, loss, cfg.grad_clip)
        last = {"loss": loss.item(), **metrics, "lr": optimizer.lr}
        if val_idx and (step % cfg.eval_interval == 0 or step == cfg.max_steps):
            val = evaluate()
            last.update({f"val_{k}": v for k, v in val.items()})
        log.step(step, last)
    log.close()

    path = Path(cfg.out_dir) / "ckpt.npz"
    save_checkpoint(path, policy, policy.config, optimizer, step=cfg.max_steps,
                    extra={"stage": "dpo", "init": cfg.init, "settings": asdict(cfg)})
    log.print(f"dpo: loss {last['loss']:.4f}, reward accuracy {last['rewards/accuracies']:.3f}; "
              f"checkpoint {path}")
    return {"checkpoint": str(path), **{k: v for k, v in last.items()}, "val": val,
            "steps": cfg.max_steps, "seconds": time.time() - t0}
