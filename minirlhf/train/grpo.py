"""GRPO (Shao et al., 2024) and its repairs, as TRL's GRPOTrainer runs them: no value model; each
prompt gets a group of G sampled completions, and each completion's reward, compared with its
group's, is the advantage of all its tokens:

    A_i = (r_i - mean_group(r)) / (std_group(r) + 1e-4)          (`group_advantages`)
    L = aggregate_t[-min(ρ_t·A_i, clip(ρ_t, 1-ε_low, 1+ε_high)·A_i) + β·k3_t]   (`grpo_loss`)

Each generation batch serves ``num_iterations`` (μ) optimiser steps; ρ = p_θ/p_old is 1 on the first
and the clip only acts after it. The KL to the reference is k3 in the *loss*, not in the reward, and
β = 0 by default (as TRL): see `minirlhf.audit` for what that optimises. Variants by flag: Dr. GRPO
is ``--scale-rewards none --loss-type dr_grpo``; DAPO's token-level loss and clip-higher are
``--loss-type dapo --epsilon-high 0.28 --mask-truncated-completions``.

The prompts, the reward (a reward model or a Python function) and the sampling are `rl`'s.
"""

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ..checkpoint import save_checkpoint
from ..datasets import collate, iterate_minibatches, load_prompts
from ..logprobs import logprobs_from_logits, token_entropy
from ..losses import group_advantages, grpo_loss
from ..optim import AdamW, param_groups
from ..tensor import no_grad
from ..tokenizer import ByteTokenizer
from .common import RunLog, batch_tensor, check_common, config_summary, load_policy, opt, optimise, require
from .rl import Rewarder, sample_batch


@dataclass
class GRPOConfig:
    prompts: str = opt("", "JSONL of {\"prompt\"} records", required=True)
    init: str = opt("runs/sft/ckpt.npz", "the policy to start from; also the frozen reference p_ref")
    reward_model: str | None = opt(None, "a reward-model checkpoint (from `minirlhf reward`)")
    reward_fn: str | None = opt(None, "or a reward function 'module:function' or 'file.py:function' "
                                      "taking (prompt, completion) -> float")
    out_dir: str = opt("runs/grpo", "where metrics.jsonl and ckpt.npz go")
    num_generations: int = opt(4, "G, completions sampled per prompt (one group)")
    scale_rewards: str = opt("group", "divide the advantages by the std of the group, the batch, "
                                      "or not at all (Dr. GRPO)", choices=["group", "batch", "none"])
    loss_type: str = opt("grpo", "how tokens are averaged (see losses.aggregate_tokens)",
                         choices=["grpo", "bnpo", "dr_grpo", "dapo"])
    num_iterations: int = opt(1, "μ, optimiser steps on each generation batch")
    beta: float = opt(0.0, "β, the weight of k3 to the reference in the loss (0: no reference)")
    epsilon_low: float = opt(0.2, "the clip's lower side, ρ >= 1 - ε_low")
    epsilon_high: float | None = opt(None, "the clip's upper side, ρ <= 1 + ε_high (default ε_low; "
                                           "DAPO: 0.28)")
    mask_truncated_completions: bool = opt(False, "leave completions cut at max_new_tokens out of "
                                                  "the loss")
    prompts_per_step: int = opt(8, "prompts per generation batch")
    max_new_tokens: int = opt(48, "longest completion, in tokens")
    max_steps: int = opt(100, "optimisation steps")
    lr: float = opt(1e-4, "learning rate")
    grad_clip: float = opt(1.0, "clip the global gradient norm (0: no clipping)")
    ckpt_interval: int = opt(50, "write a checkpoint every N steps (and at the end)")
    seed: int = opt(0, "seed of the prompts and the sampling")
    device: str = opt("cpu", "cpu (NumPy) or cuda (CuPy)", choices=["cpu", "cuda"])
    quiet: bool = opt(False, "no progress bar or messages")

    @property
    def samples_per_prompt(self):
        """`rl.sample_batch` samples this many completions per prompt: one group."""
        return self.num_generations


def check(cfg):
    # β = 0 is GRPO's default, which check_common (β > 0 for rl and dpo) would refuse
    check_common(SimpleNamespace(**{k: v for k, v in asdict(cfg).items() if k != "beta"}))
    require(cfg.beta >= 0, f"beta must be >= 0, got {cfg.beta}")
    require((cfg.reward_model is None) != (cfg.reward_fn is None),
            "give exactly one of --reward-model (a checkpoint) and --reward-fn (module:function)")
    require(cfg.num_generations >= 1, f"num_generations must be at least 1, got {cfg.num_generations}")
    require(cfg.scale_rewards != "group" or cfg.num_generations >= 2,
            "--scale-rewards group needs --num-generations 2 or more (the std of one reward is "
            "undefined); use --scale-rewards none or batch")
    require(cfg.scale_rewards != "batch" or cfg.num_generations * cfg.prompts_per_step >= 2,
            "--scale-rewards batch needs at least 2 completions per batch")
    require(cfg.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"),
            f"loss_type must be grpo, bnpo, dr_grpo or dapo, got {cfg.loss_type!r}")
    require(cfg.num_iterations >= 1, f"num_iterations must be at least 1, got {cfg.num_iterations}")
    require(0 < cfg.epsilon_low < 1, f"epsilon_low must be in (0, 1), got {cfg.epsilon_low}")
    require(cfg.epsilon_high is None or cfg.epsilon_high > 0,
            f"epsilon_high must be positive, got {cfg.epsilon_high}")
    require(cfg.prompts_per_step >= 1, f"prompts_per_step must be at least 1, got {cfg.prompts_per_step}")
    require(cfg.max_new_tokens >= 1, f"max_new_tokens must be at least 1, got {cfg.max_new_tokens}")
    require(cfg.ckpt_interval >= 1, f"ckpt_interval must be at least 1, got {cfg.ckpt_interval}")


def grpo(cfg, metrics_fn=None):
    """GRPO; returns {"checkpoint", "reward", "steps", "seconds"}.

    ``metrics_fn(prompts, completions) -> dict``, if given, adds metrics to each generation batch's
    log, as in `rl` (the demo logs the gold reward).
    """
    check(cfg)
    tokenizer = ByteTokenizer()
    records = load_prompts(cfg.prompts)
    policy = load_policy(cfg.init, cfg.device)
    ref = None
    if cfg.beta > 0:                                                     # β = 0 needs no reference
        ref = load_policy(cfg.init, cfg.device)
        ref.eval()
    rewarder = Rewarder(cfg, tokenizer)
    rng = np.random.default_rng(cfg.seed)
    optimizer = AdamW(param_groups(policy, 0.0), lr=cfg.lr)
    prompts = iterate_minibatches([r["prompt"] for r in records], cfg.prompts_per_step, rng, epochs=None)
    G, mu = cfg.num_generations, cfg.num_iterations
    max_len = cfg.max_new_tokens + 1                                     # the tokens plus an EOT

    log = RunLog(cfg.out_dir, cfg.max_steps, "grpo", quiet=cfg.quiet)
    log.print(f"grpo: {len(records)} prompts from {cfg.prompts}\n{config_summary(cfg)}")
    path = Path(cfg.out_dir) / "ckpt.npz"
    t0, last = time.time(), {}
    for step in range(1, cfg.max_steps + 1):
        if (step - 1) % mu == 0:                                         # a new generation batch
            prompt_texts = next(prompts)
            rows, completions, group = sample_batch(policy, prompt_texts, cfg, tokenizer, rng)
            row_prompts = [prompt_texts[g] for g in group]
            R = rewarder(rows, row_prompts, completions)                 # (N,)
            A = group_advantages(R, G, cfg.scale_rewards)                # (N,)
            groups = R.reshape(-1, G)
            group_std = groups.std(axis=1, ddof=1) if G > 1 else np.zeros(len(groups))

            batch = collate(rows)
            lengths = batch["completion_mask"].sum(axis=1)               # (N,) tokens incl. EOT
            truncated = lengths == max_len                               # EOT appended by sample_batch
            mask_np = batch["completion_mask"]
            if cfg.mask_truncated_completions:
                mask_np = mask_np * ~truncated[:, None]
            input_ids = batch_tensor(batch["input_ids"], cfg.device)    # (N, T)
            mask = batch_tensor(mask_np, cfg.device)                     # (N, T)
            with no_grad():
                old_logp = ref_logp = None
                if mu > 1:                                               # the sampler's log-probs
                    old_logp, _ = logprobs_from_logits(policy(input_ids), input_ids, mask)
                if ref is not None:
                    ref_logp, _ = logprobs_from_logits(ref(input_ids), input_ids, mask)
            batch_metrics = {
                "reward": float(R.mean()), "reward_std": float(group_std.mean()),
                "frac_reward_zero_std": float(np.isclose(group_std, 0).mean()),
                "completions/mean_length": float(lengths.mean()),
                "completions/clipped_ratio": float(truncated.mean())}
            if metrics_fn is not None:
                batch_metrics.update(metrics_fn(row_prompts, completions))

        logits = policy(input_ids)                                       # (N, T, V)
        logp, _ = logprobs_from_logits(logits, input_ids, mask)          # (N, T) log p_θ(y_t)
        with no_grad():
            n_tokens = max(float(mask_np.sum()), 1.0)
            entropy = float(token_entropy(logits, mask).data.sum()) / n_tokens
        old = logp.data if old_logp is None else old_logp.data           # on-policy: ρ = 1
        loss, metrics = grpo_loss(logp, old, None if ref_logp is None else ref_logp.data, A, mask,
                                  beta=cfg.beta, epsilon_low=cfg.epsilon_low,
                                  epsilon_high=cfg.epsilon_high, loss_type=cfg.loss_type,
                                  max_completion_length=max_len)
        optimise(policy, optimizer, loss, cfg.grad_clip)

        last = {"loss": loss.item(), **batch_metrics, **metrics, "entropy": entropy}
        log.step(step, last)
        if step % cfg.ckpt_interval == 0 or step == cfg.max_steps:
            save_checkpoint(path, policy, policy.config, optimizer, step=step,
                            extra={"stage": "grpo", "init": cfg.init, "settings": asdict(cfg)})
    log.close()
    log.print(f"grpo: reward {last['reward']:.3f}; checkpoint {path}")
    return {"checkpoint": str(path), "reward": last["reward"], "steps": cfg.max_steps,
            "seconds": time.time() - t0}
