"""Step 3 as InstructGPT ran it: PPO against the reward, with a per-token KL penalty, a value model
and generalised advantage estimation.

Each iteration:

1. **Roll out**: sample completions of a batch of prompts from the current policy (KV cache), score
   them with the reward model or function, and keep, per completion token, log p_old (the policy
   that sampled), log p_ref (the frozen reference) and V_old (the value model).
2. **Rewards and advantages**: the per-token reward is -β·k_t with the score added at the last token
   (`minirlhf.losses.kl_penalty_rewards`); GAE turns it into advantages A_t and returns A_t + V_t
   (`gae`), and the advantages are whitened over the batch (`masked_whiten`).
3. **Optimise**: ``ppo_epochs`` passes over ``num_minibatches`` minibatches of

       L = masked_mean(-min(ρ_t A_t, clip(ρ_t, 1-ε, 1+ε) A_t))            (`clipped_surrogate`)
         + vf_coef · ½·masked_mean(max((V - R)², (clip(V, V_old ± c) - R)²))   (`value_loss`)
         - entropy_coef · H  + ptx_coef · L_pretrain                      (optional)

   with ρ_t = p_θ(y_t)/p_old(y_t): the first minibatch of the first epoch is on-policy (ρ = 1, the
   gradient is REINFORCE's); the clip keeps the later passes over the same samples near p_old.
4. With ``target_kl``, the adaptive controller of Ziegler et al. (2019) moves β so that the KL
   stays near the target: β ← β·(1 + clip(KL/target - 1, -0.2, 0.2)·N/horizon).

The policy is saved to ``out_dir/ckpt.npz`` (a GPT, like every policy) and the value model to
``out_dir/value.npz``. Inputs are those of `minirlhf rl`.
"""

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .. import functional as F
from ..backend import to_numpy
from ..checkpoint import load_model, save_checkpoint, tokenizer_for
from ..datasets import collate, encode_corpus, get_batch, iterate_minibatches, load_prompts, load_text
from ..logprobs import logprobs_from_logits, token_entropy
from ..losses import (clipped_surrogate, gae, kl_penalty_rewards, masked_mean, masked_whiten,
                      value_loss)
from ..model import GPT, RewardModel, ValueModel
from ..optim import AdamW, clip_grad_norm_, param_groups
from ..tensor import no_grad
from .common import RunLog, batch_tensor, check_common, config_summary, load_policy, opt, require
from .rl import Rewarder, sample_batch


class NonFiniteError(ArithmeticError):
    """A NaN or inf in the advantages, the loss or the gradients: the run stops before any
    checkpoint is written, so the last one on disk is the last good one."""


@dataclass
class PPOConfig:
    prompts: str = opt("", "JSONL of {\"prompt\"} records", required=True)
    init: str = opt("runs/sft/ckpt.npz", "the policy to start from; also the frozen reference p_ref")
    reward_model: str | None = opt(None, "a reward-model checkpoint (from `minirlhf reward`); the "
                                         "value model starts as a copy of it")
    reward_fn: str | None = opt(None, "or a reward function 'module:function' or 'file.py:function' "
                                      "taking (prompt, completion) -> float")
    value_model: str | None = opt(None, "start the value model from this checkpoint instead (a "
                                        "ValueModel, a RewardModel or a GPT trunk)")
    out_dir: str = opt("runs/ppo", "where metrics.jsonl, ckpt.npz (policy) and value.npz go")
    beta: float = opt(0.1, "β, the weight of the per-token KL penalty (the start value with target_kl)")
    kl_estimator: str = opt("k1", "the per-token KL in the reward", choices=["k1", "k2", "k3"])
    target_kl: float | None = opt(None, "adaptive KL controller: move β so that KL per completion "
                                        "stays near this (nats; default: β fixed)")
    kl_horizon: int = opt(10000, "the adaptive controller's horizon, in samples")
    prompts_per_step: int = opt(8, "prompts per rollout")
    samples_per_prompt: int = opt(4, "completions sampled per prompt")
    max_new_tokens: int = opt(48, "longest completion, in tokens")
    max_steps: int = opt(100, "PPO iterations (rollout, then the epochs over it)")
    ppo_epochs: int = opt(4, "passes over each rollout")
    num_minibatches: int = opt(1, "minibatches per pass; must divide prompts_per_step x "
                                  "samples_per_prompt")
    cliprange: float = opt(0.2, "ε of the clipped surrogate: ρ is clipped to [1-ε, 1+ε]")
    cliprange_value: float = opt(0.2, "c of the clipped value loss: V is clipped to V_old ± c")
    vf_coef: float = opt(0.1, "weight of the value loss")
    entropy_coef: float = opt(0.0, "weight of the entropy bonus (0: none)")
    gamma: float = opt(1.0, "discount γ of GAE")
    lam: float = opt(0.95, "λ of GAE (1: reward-to-go minus V; 0: one-step TD error)")
    ptx_coef: float = opt(0.0, "PPO-ptx: weight γ of the pretraining loss added to each update (0: off)")
    ptx_data: str | None = opt(None, "PPO-ptx text: a .txt file or a folder; default the built-in corpus")
    ptx_batch_size: int = opt(8, "PPO-ptx: text windows per update")
    missing_eos_penalty: float | None = opt(None, "subtract this from the score of a completion that "
                                                  "never ended (hit max_new_tokens)")
    lr: float = opt(1e-4, "learning rate of the policy and the value model")
    grad_clip: float = opt(1.0, "clip the global gradient norm of both models (0: no clipping)")
    ckpt_interval: int = opt(50, "write checkpoints every N iterations (and at the end)")
    seed: int = opt(0, "seed of the prompts, the sampling and the minibatches")
    device: str = opt("cpu", "cpu (NumPy) or cuda (CuPy)", choices=["cpu", "cuda"])
    quiet: bool = opt(False, "no progress bar or messages")


def check(cfg):
    check_common(cfg)
    require((cfg.reward_model is None) != (cfg.reward_fn is None),
            "give exactly one of --reward-model (a checkpoint) and --reward-fn (module:function)")
    for name in ("prompts_per_step", "samples_per_prompt", "max_new_tokens", "ppo_epochs",
                 "num_minibatches", "ckpt_interval", "kl_horizon", "ptx_batch_size"):
        require(getattr(cfg, name) >= 1, f"{name} must be at least 1, got {getattr(cfg, name)}")
    n = cfg.prompts_per_step * cfg.samples_per_prompt
    require(n >= 2, "whitening the advantages needs at least 2 completions per rollout "
                    "(prompts_per_step x samples_per_prompt)")
    require(n % cfg.num_minibatches == 0,
            f"num_minibatches ({cfg.num_minibatches}) must divide the rollout batch, prompts_per_step "
            f"x samples_per_prompt = {n}")
    require(0 < cfg.cliprange < 1, f"cliprange must lie in (0, 1), got {cfg.cliprange}")
    require(cfg.cliprange_value > 0, f"cliprange_value must be positive, got {cfg.cliprange_value}")
    require(0 <= cfg.gamma <= 1 and 0 <= cfg.lam <= 1,
            f"gamma and lam must lie in [0, 1], got {cfg.gamma} and {cfg.lam}")
    for name in ("vf_coef", "entropy_coef", "ptx_coef"):
        require(getattr(cfg, name) >= 0, f"{name} must be >= 0, got {getattr(cfg, name)}")
    require(cfg.target_kl is None or cfg.target_kl > 0, f"target_kl must be positive, got {cfg.target_kl}")


def make_value_model(cfg, policy, rewarder):
    """The critic: a copy of the reward model (InstructGPT), else of ``value_model``, else the
    policy's trunk with a new head. Its architecture must fit the policy's: checked here, at start."""
    if cfg.value_model is not None:
        src = load_model(cfg.value_model, cfg.device)
        where = cfg.value_model
    elif rewarder.rm is not None:
        src, where = rewarder.rm, cfg.reward_model
    else:
        src, where = policy, cfg.init
    pc, vc = policy.config, src.config
    require(vc.vocab_size == pc.vocab_size and vc.block_size >= pc.block_size,
            f"the value model from {where} does not fit the policy: vocab_size {vc.vocab_size} vs "
            f"{pc.vocab_size}, block_size {vc.block_size} vs {pc.block_size} (needs equal vocabularies "
            f"and a context at least as long)")
    if isinstance(src, ValueModel):
        return src
    if isinstance(src, RewardModel):
        return ValueModel.from_reward_model(src, seed=cfg.seed)
    require(isinstance(src, GPT), f"{where} holds a {type(src).__name__}, not a model to start a "
                                  f"value model from")
    return ValueModel.from_gpt(src, seed=cfg.seed)


def adaptive_beta(beta, kl, target, horizon, n):
    """Ziegler et al.'s controller: β ← β·(1 + clip(KL/target - 1, -0.2, 0.2)·n/horizon)."""
    error = float(np.clip(kl / target - 1.0, -0.2, 0.2))
    return beta * (1.0 + error * n / horizon)


def _stop_unless_finite(value, step, what, path):
    if not np.all(np.isfinite(value)):
        raise NonFiniteError(f"step {step}: {what} is not finite (NaN or inf); stopped without "
                             f"writing a checkpoint (the last good one, if any, is {path})")


def rollout(policy, ref, value, rewarder, prompt_texts, cfg, tokenizer, rng, beta):
    """Sample, score, and compute everything the updates need, as host arrays (float64)."""
    rows, completions, group = sample_batch(policy, prompt_texts, cfg, tokenizer, rng)
    row_prompts = [prompt_texts[g] for g in group]
    scores = rewarder(rows, row_prompts, completions)                    # (N,)
    batch = collate(rows)
    mask = batch["completion_mask"].astype(np.float64)                   # (N, T)
    # a completion that hit max_new_tokens had an EOT appended by sample_batch: one token too many
    missing_eos = mask.sum(axis=1) > cfg.max_new_tokens
    if cfg.missing_eos_penalty is not None:
        scores = scores - cfg.missing_eos_penalty * missing_eos

    ids = batch_tensor(batch["input_ids"], cfg.device)
    m = batch_tensor(batch["completion_mask"], cfg.device)
    with no_grad():
        logits = policy(ids)                                             # (N, T, V)
        old_logp, _ = logprobs_from_logits(logits, ids, m)               # (N, T)
        entropy = token_entropy(logits, m)                               # (N, T)
        ref_logp, _ = logprobs_from_logits(ref(ids), ids, m)
        old_values = value(ids)                                          # (N, T)
    host = lambda t: to_numpy(t.data).astype(np.float64) * mask          # noqa: E731
    old_logp, ref_logp, old_values, entropy = map(host, (old_logp, ref_logp, old_values, entropy))

    rewards = kl_penalty_rewards(scores, old_logp, ref_logp, mask, beta, cfg.kl_estimator)
    advantages, returns = gae(rewards, old_values, mask, gamma=cfg.gamma, lam=cfg.lam)
    advantages = masked_whiten(advantages, mask)
    non_score = (rewards.sum(axis=1) - scores)                           # (N,) -β·Σ_t k_t
    kl = ((old_logp - ref_logp) * mask).sum(axis=1)                      # (N,) k1 per completion
    return {"input_ids": batch["input_ids"], "mask": mask, "old_logp": old_logp,
            "old_values": old_values, "advantages": advantages, "returns": returns,
            "scores": scores, "kl": kl, "non_score": non_score, "entropy": entropy,
            "missing_eos": missing_eos, "prompts": row_prompts, "completions": completions}


def ppo(cfg, metrics_fn=None):
    """PPO with a value model and a per-token KL penalty; returns {"checkpoint", "value_checkpoint",
    "reward", "kl", "beta", ...}. ``metrics_fn(prompts, completions) -> dict`` adds metrics to each
    iteration's log, as in `minirlhf.train.rl.rl`."""
    check(cfg)
    tokenizer = tokenizer_for(cfg.init)   # the one the model was trained with
    records = load_prompts(cfg.prompts)
    policy = load_policy(cfg.init, cfg.device)
    ref = load_policy(cfg.init, cfg.device)
    ref.eval()
    rewarder = Rewarder(cfg, tokenizer)
    value = make_value_model(cfg, policy, rewarder)
    rng = np.random.default_rng(cfg.seed)
    ptx_tokens = encode_corpus(load_text(cfg.ptx_data), tokenizer) if cfg.ptx_coef > 0 else None
    if ptx_tokens is not None:
        require(len(ptx_tokens) > policy.config.block_size + 1,
                f"ptx_data is too short for block_size {policy.config.block_size}")
    policy_opt = AdamW(param_groups(policy, 0.0), lr=cfg.lr)
    value_opt = AdamW(param_groups(value, 0.0), lr=cfg.lr)
    params = list(policy.parameters()) + list(value.parameters())
    prompts = iterate_minibatches([r["prompt"] for r in records], cfg.prompts_per_step, rng, epochs=None)

    log = RunLog(cfg.out_dir, cfg.max_steps, "ppo", quiet=cfg.quiet)
    log.print(f"ppo: {len(records)} prompts from {cfg.prompts}\n{config_summary(cfg)}")
    path, value_path = Path(cfg.out_dir) / "ckpt.npz", Path(cfg.out_dir) / "value.npz"
    t0, beta, last = time.time(), cfg.beta, {}
    n = cfg.prompts_per_step * cfg.samples_per_prompt
    size = n // cfg.num_minibatches
    for step in range(1, cfg.max_steps + 1):
        r = rollout(policy, ref, value, rewarder, next(prompts), cfg, tokenizer, rng, beta)
        _stop_unless_finite(r["advantages"], step, "an advantage", path)
        _stop_unless_finite(r["returns"], step, "a return", path)

        stats = []
        for _ in range(cfg.ppo_epochs):
            order = rng.permutation(n)
            for i in range(0, n, size):
                mb = np.sort(order[i:i + size])
                stats.append(update(policy, value, policy_opt, value_opt, params, r, mb, cfg,
                                    step, path, ptx_tokens, rng))

        kl_mean = float(r["kl"].mean())
        # TRL's names and definitions: objective/entropy is the mean of -log p_old(y|x) per completion
        last = {"objective/kl": kl_mean,
                "objective/entropy": float((-r["old_logp"]).sum(axis=1).mean()),
                "objective/non_score_reward": float(r["non_score"].mean()),
                "objective/rlhf_reward": float((r["scores"] + r["non_score"]).mean()),
                "objective/scores": float(r["scores"].mean()),
                **{k: float(np.mean([s[k] for s in stats])) for k in stats[0]},
                "policy/entropy_avg": float(r["entropy"].sum() / r["mask"].sum()),
                "beta": beta, "eos_missing": float(r["missing_eos"].mean()),
                "length": float(r["mask"].sum(axis=1).mean())}
        if metrics_fn is not None:
            last.update(metrics_fn(r["prompts"], r["completions"]))
        log.step(step, last)
        if cfg.target_kl is not None:
            beta = adaptive_beta(beta, kl_mean, cfg.target_kl, cfg.kl_horizon, n)
        if step % cfg.ckpt_interval == 0 or step == cfg.max_steps:
            extra = {"stage": "ppo", "init": cfg.init, "settings": asdict(cfg), "beta": beta}
            save_checkpoint(value_path, value, value.config, value_opt, step=step, extra=extra)
            save_checkpoint(path, policy, policy.config, policy_opt, step=step, extra=extra)
    log.close()
    log.print(f"ppo: score {last['objective/scores']:.3f}, kl {last['objective/kl']:.3f}; "
              f"checkpoints {path}, {value_path}")
    return {"checkpoint": str(path), "value_checkpoint": str(value_path),
            "reward": last["objective/scores"], "kl": last["objective/kl"], "beta": beta,
            "steps": cfg.max_steps, "seconds": time.time() - t0}


def update(policy, value, policy_opt, value_opt, params, r, mb, cfg, step, path, ptx_tokens, rng):
    """One gradient step of PPO's loss on the rows ``mb`` of the rollout ``r``; returns its metrics."""
    ids = batch_tensor(r["input_ids"][mb], cfg.device)                  # (M, T)
    mask = r["mask"][mb]                                                 # (M, T)
    m = batch_tensor(mask, cfg.device)
    logits = policy(ids)                                                 # (M, T, V)
    logp, _ = logprobs_from_logits(logits, ids, m)                       # (M, T)
    per_token, pm = clipped_surrogate(logp, r["old_logp"][mb], r["advantages"][mb], mask,
                                      epsilon_low=cfg.cliprange)
    pg_loss = masked_mean(per_token, mask)
    vf_loss, vm = value_loss(value(ids), r["old_values"][mb], r["returns"][mb], mask,
                             clip_range_value=cfg.cliprange_value)
    loss = pg_loss + cfg.vf_coef * vf_loss
    if cfg.entropy_coef > 0:
        loss = loss - cfg.entropy_coef * masked_mean(token_entropy(logits, m), mask)
    if ptx_tokens is not None:
        x, y = get_batch(ptx_tokens, policy.config.block_size, cfg.ptx_batch_size, rng)
        ptx = F.cross_entropy(policy(batch_tensor(x, cfg.device)), batch_tensor(y, cfg.device))
        loss = loss + cfg.ptx_coef * ptx
    _stop_unless_finite(loss.item(), step, f"the loss (policy {pg_loss.item():.4g}, value "
                                           f"{vf_loss.item():.4g})", path)

    policy_opt.zero_grad()
    value_opt.zero_grad()
    loss.backward()
    norm = clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip else None
    if norm is not None:
        _stop_unless_finite(norm, step, "the gradient norm", path)
    policy_opt.step()
    value_opt.step()
    with no_grad():
        ratio = np.exp(to_numpy(logp.data).astype(np.float64) - r["old_logp"][mb])
    return {"policy/approxkl_avg": pm["approxkl"], "policy/clipfrac_avg": pm["clipfrac"],
            "loss/policy_avg": pg_loss.item(), "loss/value_avg": vf_loss.item(),
            "val/clipfrac_avg": vm["clipfrac"],
            "val/ratio": float((ratio * mask).sum() / mask.sum())}
