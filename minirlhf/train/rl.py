"""Step 3 of the lecture: optimise the policy against the reward, held near the reference.

    maximise  J(θ) = E_{x, y ~ p_θ(·|x)} [R(y|x)] - β · KL(p_θ(·|x) ‖ p_ref(·|x))

with REINFORCE (the log-derivative trick, ∇E[f] = E[f ∇log p_θ]). Each step samples completions from
the current policy, scores them, and follows

    ∇J ≈ mean[(R̂(y) - b) ∇log p_θ(y|x)],   R̂(y) = R(y|x) - β·log(p_θ(y|x) / p_ref(y|x))

where R̂ is treated as a constant and b is a baseline (`minirlhf.losses.reinforce_kl_loss`).
The reference p_ref is the frozen starting policy (normally the SFT model). The reward R comes from
a trained reward model or from any Python function ``(prompt, completion) -> float``.
"""

import importlib
import importlib.util
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..backend import to_numpy
from ..checkpoint import load_model, tokenizer_for
from ..datasets import Minibatches, collate, encode_prompt, load_prompts
from ..logprobs import logprobs_from_logits, sequence_logprobs, token_entropy
from ..losses import reinforce_kl_loss
from ..model import RewardModel, generate
from ..optim import AdamW, param_groups
from ..tensor import no_grad
from .common import (ConfigError, batch_tensor, check_common, check_context, check_sampling,
                     config_summary, load_policy, option, overwrite_option, require)
from .run import Run


class RewardFunctionError(RuntimeError):
    """The user's reward function failed or returned something that is not a number."""


@dataclass
class RLConfig:
    prompts: str = option("", "JSONL of {\"prompt\"} records", required=True)
    init: str = option("runs/sft/ckpt.npz", "the policy to start from; also the frozen reference p_ref")
    reward_model: str | None = option(None, "a reward-model checkpoint (from `minirlhf reward`)")
    reward_fn: str | None = option(None, "or a reward function 'module:function' or 'file.py:function' "
                                      "taking (prompt, completion) -> float")
    out_dir: str = option("runs/rl", "where metrics.jsonl and ckpt.npz go")
    beta: float = option(0.1, "β, the weight of the KL penalty")
    baseline: str = option("loo", "b: none, mean, or loo (leave-one-out over a prompt's samples)",
                        choices=["none", "mean", "loo"])
    prompts_per_step: int = option(8, "prompts per step")
    samples_per_prompt: int = option(4, "completions sampled per prompt (loo needs 2 or more)")
    max_new_tokens: int | None = option(None, "longest completion, in tokens (default: 48, or "
                                           "block_size - 2 of a smaller policy)")
    max_steps: int = option(100, "optimisation steps")
    lr: float = option(1e-4, "learning rate")
    grad_clip: float = option(1.0, "clip the global gradient norm (0: no clipping)")
    ckpt_interval: int = option(50, "write a checkpoint every N steps (and at the end)")
    seed: int = option(0, "seed of the prompts and the sampling")
    overwrite: bool = overwrite_option()
    device: str = option("cpu", "cpu (NumPy) or cuda (CuPy)", choices=["cpu", "cuda"])
    quiet: bool = option(False, "no progress bar or messages")


def check(cfg):
    check_common(cfg)
    check_sampling(cfg, "prompts_per_step", "samples_per_prompt", "max_new_tokens")
    require(cfg.baseline != "loo" or cfg.samples_per_prompt >= 2,
            "the leave-one-out baseline needs samples_per_prompt >= 2")
    require(cfg.baseline != "mean" or cfg.samples_per_prompt >= 2,
            "the mean baseline with samples_per_prompt=1 subtracts each sample's own reward: every "
            "advantage is 0 and the policy never moves; use samples_per_prompt >= 2 or --baseline none")


def load_reward_fn(spec):
    """``"package.module:function"`` or ``"path/to/file.py:function"`` -> the function."""
    module_name, sep, fn_name = spec.rpartition(":")
    require(sep and module_name and fn_name,
            f"reward_fn must look like 'module:function' or 'file.py:function', got {spec!r}")
    try:
        if module_name.endswith(".py"):
            require(Path(module_name).is_file(), f"reward_fn: no such file {module_name}")
            loader_spec = importlib.util.spec_from_file_location("minirlhf_user_reward", module_name)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"reward_fn: cannot import {module_name!r}: {e}") from None
    fn = getattr(module, fn_name, None)
    require(callable(fn), f"reward_fn: {module_name} has no function {fn_name!r}")
    return fn


class Rewarder:
    """R(y|x) for a batch of completions, from a reward model or a Python function."""

    def __init__(self, cfg, tokenizer):
        self.tokenizer, self.device = tokenizer, cfg.device
        self.rm = self.fn = None
        if cfg.reward_model is not None:
            self.rm = load_model(cfg.reward_model, cfg.device)
            require(isinstance(self.rm, RewardModel),
                    f"{cfg.reward_model} holds a {type(self.rm).__name__}, not a RewardModel")
            self.rm.eval()
        else:
            self.fn, self.fn_name = load_reward_fn(cfg.reward_fn), cfg.reward_fn

    def __call__(self, seqs, prompts, completions):
        """sequences: ``(ids, n_prompt)`` ending with EOT; prompts/completions: the same as text."""
        if self.rm is not None:
            with no_grad():
                batch = collate(seqs)
                r = self.rm(batch_tensor(batch["input_ids"], self.device), batch["lengths"])
            return to_numpy(r.data).astype(np.float64)
        return np.array([self._call_fn(p, c) for p, c in zip(prompts, completions)])

    def _call_fn(self, prompt, completion):
        try:
            value = self.fn(prompt, completion)
        except Exception as e:
            raise RewardFunctionError(f"the reward function raised {type(e).__name__}: {e} "
                                      f"(reward_fn {self.fn_name}, prompt {prompt!r}, "
                                      f"completion {completion!r})") from None
        try:
            value = float(value)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise RewardFunctionError(f"the reward function returned {value!r}, not a finite number "
                                      f"(reward_fn {self.fn_name}, prompt {prompt!r}, "
                                      f"completion {completion!r})")
        return value


def sample_batch(policy, prompt_texts, cfg, tokenizer, rng):
    """Sample ``samples_per_prompt`` completions of each prompt from the current policy.

    Sampling is exact (temperature 1, no top-k or top-p): REINFORCE's estimator is unbiased only for
    samples drawn from p_θ itself. Returns sequences ``(ids, n_prompt)`` that end with EOT (appended
    to a completion that hit ``max_new_tokens``, so that the reward model reads every sequence the
    same way), the completions as text, the prompt index of each (its group for the baseline), and
    ``truncated`` (N,): which completions hit ``max_new_tokens`` without ending (their EOT appended).
    """
    block = policy.config.block_size
    prompt_ids = [encode_prompt(tokenizer, p, block, cfg.max_new_tokens + 1) for p in prompt_texts]
    k = cfg.samples_per_prompt
    ids = [p for p in prompt_ids for _ in range(k)]
    out = generate(policy, ids, cfg.max_new_tokens, temperature=1.0, eot_id=tokenizer.eot_id, seed=rng)
    seqs, completions, truncated = [], [], []
    for p, new in zip(ids, out.tokens):
        truncated.append(not new or new[-1] != tokenizer.eot_id)
        if truncated[-1]:
            new = new + [tokenizer.eot_id]
        seqs.append((p + new, len(p)))
        completions.append(tokenizer.decode(new))
    group = np.repeat(np.arange(len(prompt_texts)), k)
    return seqs, completions, group, np.array(truncated)


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
    tokenizer = tokenizer_for(cfg.init)   # the one the model was trained with
    policy = load_policy(cfg.init, cfg.device)
    policy.eval()   # dropout off, as TRL: samples, log p_old and log p_θ of one distribution
    block = policy.config.block_size
    if cfg.max_new_tokens is None:  # the default: 48, or what a small context leaves
        cfg = replace(cfg, max_new_tokens=min(48, block - 2))
    rewarder = Rewarder(cfg, tokenizer)
    check_context(cfg, policy, rewarder.rm)
    ref = load_policy(cfg.init, cfg.device)
    ref.eval()
    rng = np.random.default_rng(cfg.seed)                 # the sampling
    optimizer = AdamW(param_groups(policy, 0.0), lr=cfg.lr)
    start = run.restore(policy, optimizer, rngs={"sampling": rng})
    prompts = Minibatches([r["prompt"] for r in records], cfg.prompts_per_step, seed=cfg.seed)
    run.print(f"rl: {len(records)} prompts from {cfg.prompts}\n{config_summary(cfg)}")
    for step in run.steps(start):
        prompt_texts = prompts[step - 1]
        try:
            seqs, completions, group, _ = sample_batch(policy, prompt_texts, cfg, tokenizer, rng)
        except FloatingPointError:   # the last update made the logits overflow: diverged
            run.diverged("policy", "overflowing its logits")
        seq_prompts = [prompt_texts[g] for g in group]
        R = rewarder(seqs, seq_prompts, completions)                         # (N,)

        batch = collate(seqs)
        input_ids = batch_tensor(batch["input_ids"], cfg.device)            # (N, T)
        mask = batch_tensor(batch["completion_mask"], cfg.device)           # (N, T)
        logits = policy(input_ids)                                          # (N, T, V)
        _, logp = logprobs_from_logits(logits, input_ids, mask)             # (N,) log p_θ(y|x)
        with no_grad():
            _, ref_logp = sequence_logprobs(ref, input_ids, mask)           # (N,) log p_ref(y|x)
            entropy = token_entropy(logits, mask).data.sum() / batch["completion_mask"].sum()
        loss_t, metrics = reinforce_kl_loss(logp, ref_logp.data, R,
                                            cfg.beta, baseline=cfg.baseline, group=group)
        loss, grad_norm = run.update(loss_t)

        row = {"loss": loss, **metrics, "entropy": float(entropy), "grad_norm": grad_norm,
               "length": float((batch["completion_mask"].sum(axis=1)).mean())}
        if metrics_fn is not None:
            row.update(metrics_fn(seq_prompts, completions))
        run.log(step, row)
        run.save_if_due(step)
    last = run.last
    return run.finish({"reward": last.get("reward"), "kl": last.get("kl")},
                      f"reward {last.get('reward'):.3f}, kl {last.get('kl'):.3f}")
