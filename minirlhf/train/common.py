"""What every trainer shares: validation of settings (bad input is one line, `ConfigError`,
checked before any work starts), moving NumPy batches to the device, and the pieces of the
fine-tuning stages. The run itself, its folder and what it guarantees: `minirlhf.train.run.Run`.
"""

import math
from dataclasses import dataclass, field

from .. import backend
from ..losses import check_beta
from ..tensor import Tensor


def option(default, help, **extra):
    """A config field with its command-line help (``choices=[...]`` restricts its values)."""
    return field(default=default, metadata={"help": help, **extra})


def overwrite_option():
    """The ``overwrite`` field every trainer's config has (see `minirlhf.train.run.Run`)."""
    return option(False, "replace a finished run, or a run of other settings or inputs, in out_dir "
                      "(an unfinished run of the same settings is resumed)")


class ConfigError(ValueError):
    """An impossible setting; the message names it and says what would be valid."""


def require(condition, message):
    """Raise `ConfigError(message)` unless ``condition``: one line per impossible setting."""
    if not condition:
        raise ConfigError(message)


def check_common(cfg, beta_may_be_zero=False):
    """Checks shared by the trainers' configs (each field only if the config has it). β must be
    positive, or with ``beta_may_be_zero`` (GRPO, whose default is no KL term) at least 0."""
    backend.check_device(cfg.device)
    for name in ("max_steps", "batch_size", "eval_interval"):
        if hasattr(cfg, name):
            require(getattr(cfg, name) >= 1, f"{name} must be at least 1, got {getattr(cfg, name)}")
    if hasattr(cfg, "lr"):
        require(math.isfinite(cfg.lr) and cfg.lr > 0, f"lr must be positive and finite, got {cfg.lr}")
    if hasattr(cfg, "beta"):
        try:
            check_beta(cfg.beta, allow_zero=beta_may_be_zero)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    for name in ("grad_clip", "weight_decay", "margin", "label_smoothing", "val_fraction"):
        if hasattr(cfg, name):  # inf or NaN would reach the weights as NaN
            require(math.isfinite(getattr(cfg, name)), f"{name} must be a finite number, got {getattr(cfg, name)}")
    if hasattr(cfg, "grad_clip"):
        require(cfg.grad_clip >= 0, f"grad_clip must be >= 0 (0: no clipping), got {cfg.grad_clip}")
    if hasattr(cfg, "ckpt_interval"):
        require(cfg.ckpt_interval >= 1, f"ckpt_interval must be at least 1, got {cfg.ckpt_interval}")


def batch_tensor(array, device):
    """A NumPy batch array (token ids, masks) as a Tensor on ``device``, with no gradient."""
    return Tensor(array).to(device)


def config_summary(cfg):
    """The settings of a run as one readable block (printed at start: runs are reproducible)."""
    items = vars(cfg) if not hasattr(cfg, "__dataclass_fields__") else {
        k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    width = max(len(k) for k in items)
    return "\n".join(f"  {k:<{width}} = {v}" for k, v in items.items())



# ----- pieces of the fine-tuning stages --------------------------------------------------------------

def load_policy(path, device):
    """A GPT from a checkpoint (pretrain, sft, rl or dpo), on ``device``."""
    from ..checkpoint import load_model
    from ..model import GPT

    model = load_model(path, device)
    require(isinstance(model, GPT), f"{path} holds a {type(model).__name__}, not a GPT policy")
    return model


@dataclass
class RolloutConfig:
    """The settings every stage that samples from its policy and scores the samples shares (rl, ppo,
    grpo, and any new RL-style stage): a stage's config subclasses it, adds its own fields, and
    redeclares a field to change its default or help. `check_rollout` checks them."""

    prompts: str = option("", "JSONL of {\"prompt\"} records", required=True)
    init: str = option("runs/sft/ckpt.npz", "the policy to start from; also the frozen reference p_ref")
    reward_model: str | None = option(None, "a reward-model checkpoint (from `minirlhf reward`)")
    reward_fn: str | None = option(None, "or a reward function 'module:function' or 'file.py:function' "
                                      "taking (prompt, completion) -> float")
    out_dir: str = option("runs/rollout", "where metrics.jsonl and ckpt.npz go")
    prompts_per_step: int = option(8, "prompts per step")
    max_new_tokens: int = option(48, "longest completion, in tokens")
    max_steps: int = option(100, "optimisation steps")
    lr: float = option(1e-4, "learning rate")
    grad_clip: float = option(1.0, "clip the global gradient norm (0: no clipping)")
    ckpt_interval: int = option(50, "write a checkpoint every N steps (and at the end)")
    seed: int = option(0, "seed of the prompts and the sampling")
    overwrite: bool = overwrite_option()
    device: str = option("cpu", "cpu (NumPy) or cuda (CuPy)", choices=["cpu", "cuda"])
    quiet: bool = option(False, "no progress bar or messages")


def check_rollout(cfg, *counts, beta_may_be_zero=False):
    """The checks of a `RolloutConfig`: those of `check_common`, exactly one source of reward,
    ``prompts_per_step`` and ``max_new_tokens`` (None: the stage's default) at least 1, and so each
    field named in ``counts``."""
    check_common(cfg, beta_may_be_zero=beta_may_be_zero)
    require((cfg.reward_model is None) != (cfg.reward_fn is None),
            "give exactly one of --reward-model (a checkpoint) and --reward-fn (module:function)")
    for name in ("prompts_per_step", "max_new_tokens", *counts):
        value = getattr(cfg, name)
        require(value is None or value >= 1, f"{name} must be at least 1, got {value}")


def check_context(cfg, policy, reward_model=None):
    """Refuse, before any work, a ``max_new_tokens`` that cannot fit the policy's context, or a
    reward model that reads fewer tokens than a sample may hold (it would fail mid-run)."""
    block = policy.config.block_size
    # a row is the start token + the prompt (1 token at least) + the completion + a closing EOT
    require(1 <= cfg.max_new_tokens <= block - 2,
            f"max_new_tokens={cfg.max_new_tokens} does not fit the policy's context of {block} tokens: "
            f"a row also holds the start token and a closing end-of-text, so at most {block - 2}")
    if reward_model is not None:
        require(reward_model.config.block_size >= block,
                f"the reward model {cfg.reward_model} reads {reward_model.config.block_size} tokens, "
                f"fewer than the policy's context of {block}: a long sample could not be scored")


def encode_sequences(records, tokenizer, block_size, completion_field, path):
    """``(ids, n_prompt)`` sequences of ``[EOT] + prompt + record[completion_field] + [EOT]``.

    A completion that cannot fit the context is an error naming the file and line.
    """
    from ..datasets import DataError, encode_prompt_completion

    seqs = []
    for r in records:
        try:
            seqs.append(encode_prompt_completion(tokenizer, r["prompt"], r[completion_field],
                                                 block_size))
        except DataError as e:
            raise DataError(f"{path}, line {getattr(r, 'line', '?')}: field '{completion_field}': {e}") from None
    return seqs


def split_holdout(items, fraction, rng):
    """(train, held-out) with ``fraction`` of the items held out at random (at least 1 if any)."""
    require(0 <= fraction < 1, f"val_fraction must be in [0, 1), got {fraction}")
    items = list(items)
    n_val = int(round(len(items) * fraction))
    if fraction > 0 and len(items) > 1:
        n_val = max(n_val, 1)
    order = rng.permutation(len(items))
    held = [items[i] for i in order[:n_val]]
    train = [items[i] for i in order[n_val:]]
    require(train, f"no training examples left after holding out {n_val} of {len(items)}")
    return train, held


def distinct_pairs(records, path, say):
    """The preference records whose chosen and rejected differ; ``say`` one warning counting the rest.

    A pair of two equal completions carries no preference: its loss gradient is zero and its
    "accuracy" would be decided by float noise.
    """
    kept = [r for r in records if r["chosen"] != r["rejected"]]
    if len(kept) < len(records):
        say(f"warning: {path}: skipped {len(records) - len(kept)} of {len(records)} pairs whose "
            f"chosen and rejected are the same text")
    if not kept:
        from ..datasets import DataError
        raise DataError(f"{path}: every pair has chosen equal to rejected; nothing to learn")
    return kept


def weighted_means(results, weights):
    """Average metric dicts key by key, each weighted (by its batch's size): a last batch of one
    pair must not count as much as a full one."""
    keys = dict.fromkeys(k for r in results for k in r)      # every key, in the order first seen
    means = {}
    for k in keys:      # a key some batches lack (KTO's per-kind means): over those that have it
        pairs = [(r[k], w) for r, w in zip(results, weights) if k in r]
        means[k] = sum(v * w for v, w in pairs) / sum(w for _, w in pairs)
    return means
