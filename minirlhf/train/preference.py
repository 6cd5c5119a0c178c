"""What the stages of the preference family beside DPO share: their settings (`PreferenceConfig`,
which `CPOConfig`, `SimPOConfig`, `ORPOConfig` and `KTOConfig` extend) and their checks. The loop is
DPO's own (`minirlhf.train.dpo.train_pairs`); the losses are in `minirlhf.preference`.
"""

from dataclasses import dataclass

from .common import check_common, option, overwrite_option, require


@dataclass
class PreferenceConfig:
    data: str = option("", "JSONL of {\"prompt\", \"chosen\", \"rejected\"} records", required=True)
    init: str = option("runs/sft/ckpt.npz", "the policy to start from (a checkpoint or a Hugging Face folder)")
    out_dir: str = option("runs/preference", "where metrics.jsonl and ckpt.npz go")
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


def check_preference(cfg):
    """`check_common` and the family's own checks, each refusal one line."""
    check_common(cfg)
    if hasattr(cfg, "label_smoothing"):
        require(0 <= cfg.label_smoothing <= 0.5,
                f"label_smoothing must be in [0, 0.5], got {cfg.label_smoothing}")
    for name in ("cpo_alpha", "gamma", "simpo_gamma", "desirable_weight", "undesirable_weight"):
        if hasattr(cfg, name):
            value = getattr(cfg, name)
            require(value == value and abs(value) != float("inf") and value >= 0,
                    f"{name} must be a finite number >= 0, got {value}")
