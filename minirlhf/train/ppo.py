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

   with ρ_t = p_θ(y_t)/p_old(y_t): the first minibatch of the first epoch is on-policy (ρ = 1: the
   plain policy gradient with the advantages A_t); the clip keeps the later passes over the same
   samples near p_old. Dropout is off throughout, so p_old and p_θ are one function.
4. With ``target_kl``, the adaptive controller of Ziegler et al. (2019) moves β so that the KL
   stays near the target: β ← β·(1 + clip(KL/target - 1, -0.2, 0.2)·N/horizon).

The run is a `minirlhf.train.run.Run`: ``out_dir/ckpt.npz`` holds the policy (a GPT, like every
policy), its optimizer, and, for resuming bit for bit, the value model, its optimizer, the current β
and the RNG states; the finished value model alone is also written to ``out_dir/value.npz`` (for
``--value-model``). Inputs are those of `minirlhf rl`.
"""

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .. import functional as F
from ..backend import get_array_module, to_device
from ..checkpoint import load_model, save_checkpoint
from ..datasets import Minibatches, encode_corpus, get_batch, load_prompts, load_text
from ..logprobs import logprobs_from_logits, token_entropy
from ..losses import (KL_ESTIMATORS, clipped_surrogate, gae, kl_penalty_rewards, masked_mean,
                      masked_whiten, value_loss)
from ..model import GPT, RewardModel, ValueModel
from ..optim import AdamW, param_groups
from ..tensor import no_grad
from .common import RolloutConfig, batch_tensor, check_rollout, config_summary, option, require
from .rollout import open_stage, sample_rollout
from .run import Run


@dataclass
class PPOConfig(RolloutConfig):
    reward_model: str | None = option(None, "a reward-model checkpoint (from `minirlhf reward`); the "
                                         "value model starts as a copy of it")
    out_dir: str = option("runs/ppo", "where metrics.jsonl, ckpt.npz (policy) and value.npz go")
    prompts_per_step: int = option(8, "prompts per rollout")
    max_steps: int = option(100, "PPO iterations (rollout, then the epochs over it)")
    lr: float = option(1e-4, "learning rate of the policy and the value model")
    grad_clip: float = option(1.0, "clip the global gradient norm of both models (0: no clipping)")
    seed: int = option(0, "seed of the prompts, the sampling and the minibatches")
    value_model: str | None = option(None, "start the value model from this checkpoint instead (a "
                                        "ValueModel, a RewardModel or a GPT trunk)")
    beta: float = option(0.1, "β, the weight of the per-token KL penalty (the start value with "
                              "target_kl)")
    kl_estimator: str = option("k1", "the per-token KL in the reward", choices=KL_ESTIMATORS)
    target_kl: float | None = option(None, "adaptive KL controller: move β so that KL per completion "
                                        "stays near this (nats; default: β fixed)")
    kl_horizon: int = option(10000, "the adaptive controller's horizon, in samples")
    samples_per_prompt: int = option(4, "completions sampled per prompt")
    ppo_epochs: int = option(4, "passes over each rollout")
    num_minibatches: int = option(1, "minibatches per pass; must divide prompts_per_step x "
                                  "samples_per_prompt")
    cliprange: float = option(0.2, "ε of the clipped surrogate: ρ is clipped to [1-ε, 1+ε]")
    cliprange_value: float = option(0.2, "c of the clipped value loss: V is clipped to V_old ± c")
    vf_coef: float = option(0.1, "weight of the value loss")
    entropy_coef: float = option(0.0, "weight of the entropy bonus (0: none)")
    gamma: float = option(1.0, "discount γ of GAE")
    lam: float = option(0.95, "λ of GAE (1: reward-to-go minus V; 0: one-step TD error)")
    ptx_coef: float = option(0.0, "PPO-ptx: weight γ of the pretraining loss added to each update "
                                  "(0: off)")
    ptx_data: str | None = option(None, "PPO-ptx text: a .txt file or a folder; default the built-in "
                                        "corpus")
    ptx_batch_size: int = option(8, "PPO-ptx: text windows per update")
    missing_eos_penalty: float | None = option(None, "subtract this from the score of a completion that "
                                                  "never ended (hit max_new_tokens)")


def check(cfg):
    check_rollout(cfg, "samples_per_prompt", "ppo_epochs", "num_minibatches", "kl_horizon",
                  "ptx_batch_size")
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


class KLController:
    """The current β: ``cfg.beta`` throughout, or moved by `adaptive_beta` after each rollout when
    ``target_kl`` is set. Part of the checkpoint (``state_dict``), so a resumed run goes on with
    the β it had reached."""

    def __init__(self, cfg):
        self.beta, self.target, self.horizon = cfg.beta, cfg.target_kl, cfg.kl_horizon

    def update(self, kl, n):
        """After a rollout of ``n`` completions whose mean KL was ``kl``."""
        if self.target is not None:
            self.beta = adaptive_beta(self.beta, kl, self.target, self.horizon, n)

    def state_dict(self):
        return {"beta": self.beta}

    def load_state_dict(self, state):
        self.beta = float(state["beta"])


def rollout(policy, ref, value, rewarder, prompt_texts, cfg, tokenizer, rng, beta):
    """Sample, score (`sample_rollout`), and compute everything the updates need, as arrays on the
    device: per token (N, T) in float64 and 0 outside the completions, ``keep`` the completion
    tokens as booleans."""
    ro = sample_rollout(policy, rewarder, prompt_texts, cfg.samples_per_prompt, cfg.max_new_tokens,
                        tokenizer, rng, cfg.device)
    scores = ro.scores                                                   # (N,) host
    if cfg.missing_eos_penalty is not None:
        scores = scores - cfg.missing_eos_penalty * ro.truncated
    ids, keep = ro.input_ids, ro.keep
    xp = get_array_module(keep)
    mask = ro.completion_mask.data.astype(xp.float64)                    # (N, T)
    with no_grad():
        logits = policy(ids)                                             # (N, T, V)
        old_logp, _ = ro.logprobs(logits)                                # (N, T)
        entropy = token_entropy(logits, keep)                            # (N, T)
        ref_logp, _ = ro.logprobs(ref(ids))
        old_values = value(ids)                                          # (N, T)
    def per_token(t):   # float64, 0 outside the completions
        return t.data.astype(xp.float64) * mask
    old_logp, ref_logp, old_values, entropy = map(per_token, (old_logp, ref_logp, old_values, entropy))

    R = to_device(scores, cfg.device)                                    # (N,)
    rewards = kl_penalty_rewards(R, old_logp, ref_logp, keep, beta, cfg.kl_estimator)
    advantages, returns = gae(rewards, old_values, keep, gamma=cfg.gamma, lam=cfg.lam)
    advantages = masked_whiten(advantages, keep)
    non_score = rewards.sum(axis=1) - R                                  # (N,) -β·Σ_t k_t
    kl = ((old_logp - ref_logp) * mask).sum(axis=1)                      # (N,) k1 per completion
    return {"input_ids": ids.data, "keep": keep, "mask": mask, "old_logp": old_logp,
            "old_values": old_values, "advantages": advantages, "returns": returns,
            "scores": scores, "kl": kl, "non_score": non_score, "entropy": entropy,
            "missing_eos": ro.truncated, "prompts": ro.prompts, "completions": ro.completions}


def ppo(cfg, metrics_fn=None):
    """PPO with a value model and a per-token KL penalty; returns {"checkpoint", "value_checkpoint",
    "reward", "kl", "beta", ...}. ``metrics_fn(prompts, completions) -> dict`` adds metrics to each
    iteration's log, as in `minirlhf.train.rl.rl`. Running it again with the same ``out_dir`` goes
    on from the last checkpoint (`Run`)."""
    check(cfg)
    with Run(cfg, "ppo") as run:
        return run.result if run.finished else _train(cfg, run, metrics_fn)


def _train(cfg, run, metrics_fn):
    records = load_prompts(cfg.prompts)
    cfg, tokenizer, policy, ref, rewarder = open_stage(cfg)
    value = make_value_model(cfg, policy, rewarder)
    value.eval()    # the values of the rollout and of the updates, from one function
    ptx_tokens = encode_corpus(load_text(cfg.ptx_data), tokenizer) if cfg.ptx_coef > 0 else None
    if ptx_tokens is not None:
        require(len(ptx_tokens) > policy.config.block_size + 1,
                f"ptx_data is too short for block_size {policy.config.block_size}")
    rng = np.random.default_rng(cfg.seed)          # the sampling, the minibatches, the ptx windows
    policy_optimizer = AdamW(param_groups(policy, 0.0), lr=cfg.lr)
    value_optimizer = AdamW(param_groups(value, 0.0), lr=cfg.lr)
    kl_ctl = KLController(cfg)
    start = run.restore(policy, policy_optimizer,
                        rngs={"sampling": rng},
                        also={"value": value, "value_optimizer": value_optimizer,
                              "kl_controller": kl_ctl})
    prompts = Minibatches([r["prompt"] for r in records], cfg.prompts_per_step, seed=cfg.seed)
    run.print(f"ppo: {len(records)} prompts from {cfg.prompts}\n{config_summary(cfg)}")
    n = cfg.prompts_per_step * cfg.samples_per_prompt
    size = n // cfg.num_minibatches
    for step in run.steps(start):
        with run.overflow_diverges("policy"):
            data = rollout(policy, ref, value, rewarder, prompts[step - 1], cfg, tokenizer, rng,
                           kl_ctl.beta)
        run.check_finite("advantage", data["advantages"])
        run.check_finite("return", data["returns"])

        stats = []
        for _ in range(cfg.ppo_epochs):
            order = rng.permutation(n)
            for i in range(0, n, size):
                rows = to_device(np.sort(order[i:i + size]), cfg.device)  # one minibatch
                stats.append(update(run, policy, value, policy_optimizer, value_optimizer, data, rows,
                                    cfg, ptx_tokens, rng))

        kl_mean = float(data["kl"].mean())
        # TRL's names and definitions: objective/entropy is the mean of -log p_old(y|x) per completion
        row = {"objective/kl": kl_mean,
               "objective/entropy": float((-data["old_logp"]).sum(axis=1).mean()),
               "objective/non_score_reward": float(data["non_score"].mean()),
               "objective/rlhf_reward": float((data["scores"] + data["non_score"]).mean()),
               "objective/scores": float(data["scores"].mean()),
               **{k: float(np.mean([s[k] for s in stats])) for k in stats[0]},
               "policy/entropy_avg": float(data["entropy"].sum() / data["mask"].sum()),
               "beta": kl_ctl.beta, "eos_missing": float(data["missing_eos"].mean()),
               "length": float(data["mask"].sum(axis=1).mean())}
        if metrics_fn is not None:
            row.update(metrics_fn(data["prompts"], data["completions"]))
        run.log(step, row)
        kl_ctl.update(kl_mean, n)
        run.save_if_due(step)
    # the value model alone, for `--value-model` (the checkpoint holds it too, to resume)
    value_path = Path(cfg.out_dir) / "value.npz"
    save_checkpoint(value_path, value, value.config, step=cfg.max_steps,
                    extra={"stage": "ppo", "init": cfg.init, "settings": asdict(cfg)})
    last = run.last
    return run.finish({"value_checkpoint": str(value_path), "reward": last.get("objective/scores"),
                       "kl": last.get("objective/kl"), "beta": kl_ctl.beta},
                      f"score {last.get('objective/scores'):.3f}, kl {last.get('objective/kl'):.3f}")


def update(run, policy, value, policy_optimizer, value_optimizer, data, rows, cfg, ptx_tokens, rng):
    """One gradient step of PPO's loss on the sequences ``rows`` of the rollout ``data``; returns
    its metrics. Both models step together on one loss (`Run.update` with both): the loss and the
    gradient norm of both models are checked before any weight moves."""
    ids = batch_tensor(data["input_ids"][rows], cfg.device)             # (M, T)
    keep = data["keep"][rows]                                            # (M, T) bool
    logits = policy(ids)                                                 # (M, T, V)
    logp, _ = logprobs_from_logits(logits, ids, keep)                    # (M, T)
    per_token, pg_stats = clipped_surrogate(logp, data["old_logp"][rows], data["advantages"][rows],
                                            keep, epsilon_low=cfg.cliprange)
    pg_loss = masked_mean(per_token, keep)
    vf_loss, vf_stats = value_loss(value(ids), data["old_values"][rows], data["returns"][rows], keep,
                                   clip_range_value=cfg.cliprange_value)
    loss = pg_loss + cfg.vf_coef * vf_loss
    if cfg.entropy_coef > 0:
        loss = loss - cfg.entropy_coef * masked_mean(token_entropy(logits, keep), keep)
    if ptx_tokens is not None:
        x, y = get_batch(ptx_tokens, policy.config.block_size, cfg.ptx_batch_size, rng)
        ptx = F.cross_entropy(policy(batch_tensor(x, cfg.device)), batch_tensor(y, cfg.device))
        loss = loss + cfg.ptx_coef * ptx
    pg_value, vf_value = pg_loss.item(), vf_loss.item()
    _, grad_norm = run.update(loss, models=(policy, value),
                              optimizers=(policy_optimizer, value_optimizer),
                              what=f"loss (policy {pg_value:.4g}, value {vf_value:.4g})")
    return {"policy/approxkl_avg": pg_stats["approxkl"], "policy/clipfrac_avg": pg_stats["clipfrac"],
            "loss/policy_avg": pg_value, "loss/value_avg": vf_value,
            "val/clipfrac_avg": vf_stats["clipfrac"], "val/ratio": pg_stats["ratio"],
            "grad_norm": grad_norm}
