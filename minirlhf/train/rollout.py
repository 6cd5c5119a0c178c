"""What every stage that samples from its policy shares (rl, ppo, grpo, and any new RL-style stage):
the reward, R(y|x) from a reward model or a Python function, and the rollout, the opening of each
of their steps:

    sample k completions of each prompt -> score them -> collate the rows -> on the device

    rollout = sample_rollout(policy, rewarder, prompt_texts, k, max_new_tokens, tokenizer, rng, device)
    logits = policy(rollout.input_ids)                               # (N, T, V)
    per_token, per_seq = rollout.logprobs(logits)                    # (N, T), (N,)

A new stage builds on `sample_rollout` and `Rewarder`, and its config on
`minirlhf.train.common.RolloutConfig` (the settings every such stage has).
"""

import importlib
import importlib.util
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..backend import to_device, to_numpy
from ..checkpoint import load_model, tokenizer_for
from ..datasets import collate, encode_prompt
from ..logprobs import logprobs_from_logits
from ..model import RewardModel, generate
from ..tensor import Tensor, no_grad
from .common import ConfigError, batch_tensor, check_context, load_policy, require


class RewardFunctionError(RuntimeError):
    """The user's reward function failed or returned something that is not a number."""


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
    """R(y|x) for a batch of completions, from ``cfg.reward_model`` (a checkpoint) or
    ``cfg.reward_fn`` (``module:function``), whichever the config names."""

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
        """(N,) float64 host rewards. ``seqs``: ``(ids, n_prompt)`` ending with EOT;
        ``prompts``/``completions``: the same as text."""
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


def open_stage(cfg, reference=True):
    """What every stage that samples from its policy opens with: ``(cfg, tokenizer, policy, ref,
    rewarder)``.

    The tokenizer is the one the policy was trained with; the policy is in eval mode (dropout off,
    as TRL: the samples, log p_old and log p_θ then come from one distribution); ``ref`` is a
    second, frozen copy of it, p_ref (None without ``reference``: GRPO at β = 0, or best-of-n,
    whose policy is its own reference); ``rewarder`` the `Rewarder` the config names. A
    ``max_new_tokens`` of None becomes the default, 48 or what a small context leaves, and
    `check_context` refuses one that cannot fit, before any work.
    """
    tokenizer = tokenizer_for(cfg.init)
    policy = load_policy(cfg.init, cfg.device)
    policy.eval()
    ref = None
    if reference:
        ref = load_policy(cfg.init, cfg.device)
        ref.eval()
    if cfg.max_new_tokens is None:
        cfg = replace(cfg, max_new_tokens=min(48, policy.config.block_size - 2))
    rewarder = Rewarder(cfg, tokenizer)
    check_context(cfg, policy, rewarder.rm)
    return cfg, tokenizer, policy, ref, rewarder


def sample_sequences(policy, prompt_ids, k, max_new_tokens, eot_id, rng):
    """Sample ``k`` completions of each token-id prompt in one `generate` batch (KV cache), exactly
    (temperature 1, no top-k or top-p). Rows ``i*k .. i*k + k-1`` are prompt i's.

    Returns ``seqs``: ``(ids, n_prompt)`` rows that end with EOT (appended to a completion that hit
    ``max_new_tokens``, so that a reward model reads every sequence the same way), ``truncated``
    (N,) bool: which were closed that way, and ``logprobs`` (N,): log p(y|x) of each completion's
    sampled tokens under the policy (the appended EOT not counted: it was not drawn).
    """
    rows = [list(p) for p in prompt_ids for _ in range(k)]
    out = generate(policy, rows, max_new_tokens, temperature=1.0, eot_id=eot_id, seed=rng)
    seqs, truncated = [], []
    for p, new in zip(rows, out.tokens):
        truncated.append(not new or new[-1] != eot_id)
        seqs.append((p + new + ([eot_id] if truncated[-1] else []), len(p)))
    logprobs = np.array([float(sum(lp)) for lp in out.logprobs], dtype=np.float64)
    return seqs, np.array(truncated, dtype=bool), logprobs


def sample_completions(policy, prompt_texts, k, max_new_tokens, tokenizer, rng):
    """Sample ``k`` completions of each prompt from the current policy, at most ``max_new_tokens``
    (`sample_sequences` on the encoded prompts).

    Sampling is exact: the policy-gradient estimators are unbiased only for samples drawn from p_θ
    itself. Returns the sequences ``(ids, n_prompt)`` ending with EOT, the completions as text, the
    prompt index of each (N,) (its group: rows ``i*k .. i*k + k-1`` are prompt i's), and
    ``truncated`` (N,): which completions hit ``max_new_tokens`` without ending (their EOT appended).
    """
    block = policy.config.block_size
    prompt_ids = [encode_prompt(tokenizer, p, block, max_new_tokens + 1) for p in prompt_texts]
    seqs, truncated, _ = sample_sequences(policy, prompt_ids, k, max_new_tokens, tokenizer.eot_id, rng)
    completions = [tokenizer.decode(ids[n_prompt:]) for ids, n_prompt in seqs]
    group = np.repeat(np.arange(len(prompt_texts)), k)
    return seqs, completions, group, truncated


@dataclass
class Rollout:
    """One batch of N = prompts x k sampled completions, scored and collated.

    Host (NumPy): ``seqs`` (``(ids, n_prompt)`` rows), ``prompts`` and ``completions`` (N texts),
    ``group`` (N,) the prompt index of each row, ``truncated`` (N,) bool, ``scores`` (N,) float64
    R(y|x), ``batch`` the `minirlhf.datasets.collate` dict. On the device: ``input_ids`` (N, T) and
    ``completion_mask`` (N, T) as Tensors, ``keep`` (N, T) the mask as booleans (what the losses
    take).
    """

    seqs: list
    prompts: list
    completions: list
    group: np.ndarray
    truncated: np.ndarray
    scores: np.ndarray
    batch: dict
    input_ids: Tensor
    completion_mask: Tensor
    keep: object

    def logprobs(self, logits):
        """``(per_token (N, T), per_sequence (N,))`` log-probs of the completions under ``logits``
        (N, T, V) (`minirlhf.logprobs.logprobs_from_logits`)."""
        return logprobs_from_logits(logits, self.input_ids, self.completion_mask)


def sample_rollout(policy, rewarder, prompt_texts, k, max_new_tokens, tokenizer, rng, device):
    """Sample ``k`` completions of each of ``prompt_texts`` (`sample_completions`), score them with
    ``rewarder`` (a `Rewarder`), and collate them onto ``device``: a `Rollout`.

    ``rng`` (a ``numpy.random.Generator``) draws the samples: the same state gives the same
    rollout. A ``FloatingPointError`` (logits that overflow) reaches the caller, which decides
    what it means (`minirlhf.train.run.Run.overflow_diverges`)."""
    seqs, completions, group, truncated = sample_completions(policy, prompt_texts, k,
                                                             max_new_tokens, tokenizer, rng)
    prompts = [prompt_texts[g] for g in group]
    scores = rewarder(seqs, prompts, completions)                        # (N,)
    batch = collate(seqs)
    return Rollout(seqs=seqs, prompts=prompts, completions=completions, group=group,
                   truncated=truncated, scores=scores, batch=batch,
                   input_ids=batch_tensor(batch["input_ids"], device),            # (N, T)
                   completion_mask=batch_tensor(batch["completion_mask"], device),  # (N, T)
                   keep=to_device(batch["completion_mask"] != 0, device))         # (N, T) bool
