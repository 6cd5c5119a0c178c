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

The prompts, the reward (a reward model or a Python function) and the sampling are `rl`'s. The run
is a `minirlhf.train.run.Run` (resumed bit for bit; its checkpoint also holds the generation batch
that the remaining steps of its μ still use).
"""

import math
from dataclasses import dataclass

import numpy as np

from ..backend import to_device, to_numpy
from ..datasets import Minibatches, load_prompts
from ..logprobs import logprobs_from_logits, token_entropy
from ..losses import LOSS_TYPES, SCALES, check_scale, group_advantages, grpo_loss
from ..optim import AdamW, param_groups
from ..tensor import no_grad
from .common import (ConfigError, RolloutConfig, batch_tensor, check_rollout, config_summary,
                     option, require)
from .rollout import open_stage, sample_rollout
from .run import Run


@dataclass
class GRPOConfig(RolloutConfig):
    out_dir: str = option("runs/grpo", "where metrics.jsonl and ckpt.npz go")
    prompts_per_step: int = option(8, "prompts per generation batch")
    num_generations: int = option(4, "G, completions sampled per prompt (one group)")
    scale_rewards: str = option("group", "divide the advantages by the std of the group, the batch, "
                                      "or not at all (Dr. GRPO)", choices=SCALES)
    loss_type: str = option("grpo", "how tokens are averaged (see losses.aggregate_tokens)",
                            choices=LOSS_TYPES)
    num_iterations: int = option(1, "μ, optimiser steps on each generation batch")
    beta: float = option(0.0, "β, the weight of k3 to the reference in the loss (0: no reference)")
    epsilon_low: float = option(0.2, "the clip's lower side, ρ >= 1 - ε_low")
    epsilon_high: float | None = option(None, "the clip's upper side, ρ <= 1 + ε_high "
                                              "(default ε_low; DAPO: 0.28)")
    mask_truncated_completions: bool = option(False, "leave completions cut at max_new_tokens out of "
                                                  "the loss")


def check(cfg):
    check_rollout(cfg, "num_generations", "num_iterations",
                  beta_may_be_zero=True)                 # β = 0, no KL term, is GRPO's default
    try:
        check_scale(cfg.scale_rewards, cfg.num_generations, cfg.num_generations * cfg.prompts_per_step)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    require(cfg.loss_type in LOSS_TYPES,
            f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {cfg.loss_type!r}")
    require(0 < cfg.epsilon_low < 1, f"epsilon_low must be in (0, 1), got {cfg.epsilon_low}")
    require(cfg.epsilon_high is None or cfg.epsilon_high > 0,
            f"epsilon_high must be positive, got {cfg.epsilon_high}")


class GenerationBatch:
    """What the μ steps of one generation batch share, on the device: the sampled sequences
    (``input_ids``), the tokens in the loss (``keep``, booleans), their ``advantages`` (N,), the
    log-probs of the policy that sampled them (``old_logp``, μ > 1) and of the reference
    (``ref_logp``, β > 0), and the batch's ``metrics``. It is part of the checkpoint (as host
    arrays, ``keep`` as a 0/1 ``mask``), so a run resumed in the middle of a batch goes on with the
    same samples."""

    ARRAYS = ("input_ids", "advantages", "old_logp", "ref_logp")

    def __init__(self, device, input_ids=None, keep=None, advantages=None, old_logp=None,
                 ref_logp=None, metrics=None):
        self.device, self.keep, self.metrics = device, keep, metrics
        self.input_ids, self.advantages = input_ids, advantages
        self.old_logp, self.ref_logp = old_logp, ref_logp

    def take(self, other):
        """Hold ``other``'s batch from now on (this object is the one the checkpoint saves)."""
        self.__dict__.update(other.__dict__)

    def state_dict(self):
        state = {name: to_numpy(getattr(self, name)) for name in self.ARRAYS
                 if getattr(self, name) is not None}
        if self.keep is not None:
            state["mask"] = to_numpy(self.keep).astype(np.float32)
        if self.metrics is not None:
            state["metrics"] = self.metrics
        return state

    def load_state_dict(self, state):
        arrays = {name: to_device(state[name], self.device) for name in self.ARRAYS if name in state}
        keep = to_device(np.asarray(state["mask"]) != 0, self.device) if "mask" in state else None
        self.__init__(self.device, keep=keep, metrics=state.get("metrics"), **arrays)


def generate_batch(policy, ref, rewarder, prompt_texts, cfg, tokenizer, rng, metrics_fn):
    """Sample G completions of each prompt (`sample_rollout`), score them, and compute what the μ
    steps need: a filled `GenerationBatch`."""
    G = cfg.num_generations
    ro = sample_rollout(policy, rewarder, prompt_texts, G, cfg.max_new_tokens, tokenizer, rng,
                        cfg.device)
    R = ro.scores                                                        # (N,)
    groups = R.reshape(-1, G)
    group_std = groups.std(axis=1, ddof=1) if G > 1 else np.zeros(len(groups))

    lengths = ro.batch["completion_mask"].sum(axis=1)                    # (N,) tokens incl. EOT
    keep = ro.keep                                                       # (N, T) bool
    if cfg.mask_truncated_completions:
        keep = keep & to_device(~ro.truncated[:, None], cfg.device)
    with no_grad():
        old_logp = ref_logp = None
        if cfg.num_iterations > 1:                                       # the sampler's log-probs
            old_logp = logprobs_from_logits(policy(ro.input_ids), ro.input_ids, keep)[0].data
        if ref is not None:
            ref_logp = logprobs_from_logits(ref(ro.input_ids), ro.input_ids, keep)[0].data
    metrics = {"reward": float(R.mean()), "reward_std": float(group_std.mean()),
               "frac_reward_zero_std": float(np.isclose(group_std, 0).mean()),
               "completions/mean_length": float(lengths.mean()),
               "completions/clipped_ratio": float(ro.truncated.mean())}
    if metrics_fn is not None:
        metrics.update(metrics_fn(ro.prompts, ro.completions))
    advantages = to_device(group_advantages(R, G, cfg.scale_rewards), cfg.device)   # (N,)
    return GenerationBatch(cfg.device, input_ids=ro.input_ids.data, keep=keep,
                           advantages=advantages, old_logp=old_logp, ref_logp=ref_logp,
                           metrics=metrics)


def grpo(cfg, metrics_fn=None):
    """GRPO; returns {"checkpoint", "reward", "steps", "seconds"}.

    ``metrics_fn(prompts, completions) -> dict``, if given, adds metrics to each generation batch's
    log, as in `rl` (the demo logs the gold reward). Running it again with the same ``out_dir``
    goes on from the last checkpoint (`Run`).
    """
    check(cfg)
    with Run(cfg, "grpo") as run:
        return run.result if run.finished else _train(cfg, run, metrics_fn)


def _train(cfg, run, metrics_fn):
    records = load_prompts(cfg.prompts)
    cfg, tokenizer, policy, ref, rewarder = open_stage(cfg, reference=cfg.beta > 0)   # β = 0: no p_ref
    rng = np.random.default_rng(cfg.seed)                                # the sampling
    optimizer = AdamW(param_groups(policy, 0.0), lr=cfg.lr)
    mu = cfg.num_iterations
    gen = GenerationBatch(cfg.device)
    # with μ = 1 every step samples afresh: no batch outlives its step, none needs saving
    start = run.restore(policy, optimizer, rngs={"sampling": rng},
                        also={"generation_batch": gen} if mu > 1 else {})
    prompts = Minibatches([r["prompt"] for r in records], cfg.prompts_per_step, seed=cfg.seed)
    run.print(f"grpo: {len(records)} prompts from {cfg.prompts}\n{config_summary(cfg)}")
    for step in run.steps(start):
        if (step - 1) % mu == 0:                                         # a new generation batch
            with run.overflow_diverges("policy"):
                new = generate_batch(policy, ref, rewarder, prompts[(step - 1) // mu], cfg,
                                     tokenizer, rng, metrics_fn)
            gen.take(new)   # the same object: the checkpoint holds the batch in use
            run.check_finite("advantage", gen.advantages)

        input_ids = batch_tensor(gen.input_ids, cfg.device)             # (N, T)
        logits = policy(input_ids)                                       # (N, T, V)
        logp, _ = logprobs_from_logits(logits, input_ids, gen.keep)      # (N, T) log p_θ(y_t)
        with no_grad():
            n_tokens = max(float(gen.keep.sum()), 1.0)
            entropy = float(token_entropy(logits, gen.keep).data.sum()) / n_tokens
        old = logp.data if gen.old_logp is None else gen.old_logp        # μ = 1: ρ = 1
        loss_t, metrics = grpo_loss(logp, old, gen.ref_logp, gen.advantages, gen.keep,
                                    beta=cfg.beta, epsilon_low=cfg.epsilon_low,
                                    epsilon_high=cfg.epsilon_high, loss_type=cfg.loss_type,
                                    max_completion_length=cfg.max_new_tokens + 1)
        loss, grad_norm = run.update(loss_t)

        run.log(step, {"loss": loss, **gen.metrics, **metrics, "entropy": entropy,
                       "grad_norm": grad_norm})
        run.save_if_due(step)
    last = run.last
    return run.finish({"reward": last.get("reward")}, f"reward {last.get('reward', math.nan):.3f}")
