"""Step 3 of the lecture: optimise the policy against the reward, held near the reference.

    maximise  J(θ) = E_{x, y ~ p_θ(·|x)} [R(y|x)] - β · KL(p_θ(·|x) ‖ p_ref(·|x))

with REINFORCE (the log-derivative trick, ∇E[f] = E[f ∇log p_θ]). Each step samples completions from
the current policy, scores them, and follows

    ∇J ≈ mean[(R̂(y) - b) ∇log p_θ(y|x)],   R̂(y) = R(y|x) - β·log(p_θ(y|x) / p_ref(y|x))

where R̂ is treated as a constant and b is a baseline (`minirlhf.losses.reinforce_kl_loss`).
The reference p_ref is the frozen starting policy (normally the SFT model). The reward R comes from
a trained reward model or from any Python function ``(prompt, completion) -> float``.
"""

from dataclasses import dataclass

import numpy as np

from ..datasets import Minibatches, load_prompts
from ..logprobs import token_entropy
from ..losses import BASELINES, reinforce_kl_loss
from ..optim import AdamW, param_groups
from ..tensor import no_grad
from .common import RolloutConfig, check_rollout, config_summary, option, require
from .rollout import open_stage, sample_rollout
from .run import Run


@dataclass
class RLConfig(RolloutConfig):
    out_dir: str = option("runs/rl", "where metrics.jsonl and ckpt.npz go")
    max_new_tokens: int | None = option(None, "longest completion, in tokens (default: 48, or "
                                           "block_size - 2 of a smaller policy)")
    beta: float = option(0.1, "β, the weight of the KL penalty")
    baseline: str = option("loo", "b: none, mean, or loo (leave-one-out over a prompt's samples)",
                           choices=BASELINES)
    samples_per_prompt: int = option(4, "completions sampled per prompt (loo needs 2 or more)")


def check(cfg):
    check_rollout(cfg, "samples_per_prompt")
    require(cfg.baseline != "loo" or cfg.samples_per_prompt >= 2,
            "the leave-one-out baseline needs samples_per_prompt >= 2")
    require(cfg.baseline != "mean" or cfg.samples_per_prompt >= 2,
            "the mean baseline with samples_per_prompt=1 subtracts each sample's own reward: every "
            "advantage is 0 and the policy never moves; use samples_per_prompt >= 2 or --baseline none")


def rl(cfg, metrics_fn=None):
    """REINFORCE with a KL penalty; returns {"checkpoint", "reward", "kl", ...}.

    ``metrics_fn(prompts, completions) -> dict``, if given, adds metrics to each step's log (the demo
    logs the hidden gold reward this way, to watch the reward model being over-optimised).
    Running it again with the same ``out_dir`` goes on from the last checkpoint (`Run`).
    """
    check(cfg)
    with Run(cfg, "rl") as run:
        return run.result if run.finished else _train(cfg, run, metrics_fn)


def _train(cfg, run, metrics_fn):
    records = load_prompts(cfg.prompts)
    cfg, tokenizer, policy, ref, rewarder = open_stage(cfg)
    rng = np.random.default_rng(cfg.seed)                 # the sampling
    optimizer = AdamW(param_groups(policy, 0.0), lr=cfg.lr)
    start = run.restore(policy, optimizer, rngs={"sampling": rng})
    prompts = Minibatches([r["prompt"] for r in records], cfg.prompts_per_step, seed=cfg.seed)
    run.print(f"rl: {len(records)} prompts from {cfg.prompts}\n{config_summary(cfg)}")
    for step in run.steps(start):
        with run.overflow_diverges("policy"):
            ro = sample_rollout(policy, rewarder, prompts[step - 1], cfg.samples_per_prompt,
                                cfg.max_new_tokens, tokenizer, rng, cfg.device)
        mask = ro.batch["completion_mask"]                                  # (N, T) host
        logits = policy(ro.input_ids)                                       # (N, T, V)
        _, logp = ro.logprobs(logits)                                       # (N,) log p_θ(y|x)
        with no_grad():
            _, ref_logp = ro.logprobs(ref(ro.input_ids))                    # (N,) log p_ref(y|x)
            entropy = token_entropy(logits, ro.completion_mask).data.sum() / mask.sum()
        loss_t, metrics = reinforce_kl_loss(logp, ref_logp.data, ro.scores,
                                            cfg.beta, baseline=cfg.baseline, group=ro.group)
        loss, grad_norm = run.update(loss_t)

        row = {"loss": loss, **metrics, "entropy": float(entropy), "grad_norm": grad_norm,
               "length": float(mask.sum(axis=1).mean())}
        if metrics_fn is not None:
            row.update(metrics_fn(ro.prompts, ro.completions))
        run.log(step, row)
        run.save_if_due(step)
    last = run.last
    return run.finish({"reward": last.get("reward"), "kl": last.get("kl")},
                      f"reward {last.get('reward'):.3f}, kl {last.get('kl'):.3f}")
