"""RLHF on a problem small enough to enumerate, where the answer is known in closed form.

With ``n`` tokens and completions of fixed length ``L`` there are N = n^L completions per prompt
(3 tokens, length 3: 27), so every probability can be computed exactly, by running the model on all
of them. The KL-regularised RLHF objective

    J(p) = E_{y~p}[R(y|x)] - β·KL(p(·|x) ‖ p_ref(·|x))

has the unique maximiser

    p*(y|x) = p_ref(y|x) · exp(R(y|x)/β) / Z(x),        Z(x) = Σ_y p_ref(y|x) · exp(R(y|x)/β),

because J(p) = -β·KL(p ‖ p*) + β·log Z(x). So KL(p_θ ‖ p*) measures how far training is from the
optimum, in nats. This module provides the pieces to check that the library's losses get there:
REINFORCE-with-KL trained by sampling, PPO as InstructGPT ran it (with a `TabularValue` critic),
DPO trained on Bradley-Terry preference pairs, and a Bradley-Terry reward model, which recovers R
up to a constant per prompt.

A *policy* is any callable mapping ``input_ids`` (B, T) to logits (B, T, n_tokens): a `GPT` or the
`TabularPolicy` below. Prompts are rows of token ids (P, Tp); the model sees ``prompt + completion``
and every log-prob goes through `minirlhf.logprobs.sequence_logprobs`, the same code the trainers
use, so these experiments test that path too. The vocabulary is exactly the n completion tokens,
so the N probabilities of each prompt sum to 1.

`TabularPolicy` holds one row of logits per (prompt, completion prefix): it can represent every
autoregressive policy on this problem, p* included, and reaches p* in a few hundred steps of a few
milliseconds each, which is why the convergence tests use it. A tiny GPT (1 layer, n_embd 16)
trained by the very same loops reaches the same tolerances too, but needs ~1500 steps and about
two minutes on two cores (``python examples/closed_form.py --model gpt``), too slow for CI.
"""

from dataclasses import dataclass

import numpy as np

from . import backend
from . import functional as F
from . import ops
from .logprobs import sequence_logprobs
from .losses import (bt_loss, clipped_surrogate, dpo_loss, gae, kl_penalty_rewards, masked_mean,
                     masked_whiten, reinforce_kl_loss, value_loss)
from .nn import Module, Parameter
from .optim import AdamW, lr_schedule
from .tensor import Tensor, no_grad

# ===================================================================================================
# the problem


def enumerate_completions(n_tokens, length):
    """All n_tokens**length completions (N, length), in lexicographic order.

    Row j holds the base-n digits of j, so `completion_index` inverts it.
    """
    if n_tokens < 1 or length < 1:
        raise ValueError(f"need n_tokens >= 1 and length >= 1, got {n_tokens} and {length}")
    j = np.arange(n_tokens ** length)
    powers = n_tokens ** np.arange(length - 1, -1, -1)                    # most significant first
    return (j[:, None] // powers[None, :]) % n_tokens                     # (N, L)


def completion_index(completions, n_tokens):
    """The row of each completion (B, L) in `enumerate_completions`: its base-n value, (B,)."""
    completions = np.asarray(completions)
    powers = n_tokens ** np.arange(completions.shape[-1] - 1, -1, -1)
    return completions @ powers


@dataclass
class ToyProblem:
    """Prompts (P, Tp), all completions (N, L), a reward table R (P, N) and the KL weight β."""

    prompts: np.ndarray
    completions: np.ndarray
    R: np.ndarray
    beta: float
    n_tokens: int

    @property
    def length(self):
        return self.completions.shape[1]


def make_problem(n_prompts=2, n_tokens=3, length=3, beta=1.0, reward_scale=1.0, seed=0):
    """A toy problem: prompt p is the single token p, R(y|x) ~ N(0, reward_scale²) per pair."""
    if not beta > 0:
        raise ValueError(f"make_problem: beta must be > 0, got {beta}")
    if n_prompts > n_tokens:
        raise ValueError(f"one-token prompts need n_prompts <= n_tokens, got {n_prompts} > {n_tokens}")
    rng = np.random.default_rng(seed)
    completions = enumerate_completions(n_tokens, length)
    R = reward_scale * rng.standard_normal((n_prompts, len(completions)))
    prompts = np.arange(n_prompts)[:, None]                               # (P, 1)
    return ToyProblem(prompts, completions, R, float(beta), n_tokens)


def make_sequences(prompts, completions):
    """``prompt + completion`` for the given pairs, with the completion mask.

    prompts (B, Tp), completions (B, L) -> input_ids (B, Tp+L), completion_mask (B, Tp+L) with
    1 on the L completion tokens (the toy problem has no EOT: every completion has length L).
    """
    prompts, completions = np.asarray(prompts), np.asarray(completions)
    ids = np.concatenate([prompts, completions], axis=1)
    mask = np.zeros(ids.shape, dtype=np.float32)
    mask[:, prompts.shape[1]:] = 1
    return ids, mask


# ===================================================================================================
# exact distributions


def _all_sequences(model, prompts, completions):
    """`sequence_logprobs` of every (prompt, completion) pair in one batch of P·N sequences, row
    p·N + j for prompt p and completion j: per_token (P·N, Tp+L), per_sequence (P·N,)."""
    P, N = len(prompts), len(completions)
    ids, mask = make_sequences(np.repeat(prompts, N, axis=0), np.tile(completions, (P, 1)))
    return sequence_logprobs(model, ids, mask)


def exact_logprobs(model, prompts, completions):
    """log p(y|x) of every completion under ``model``, as a differentiable Tensor (P, N).

    One batch of P·N sequences through `sequence_logprobs`: autograd through this table gives exact
    gradients of any function of the policy, such as the RLHF objective. (The same sum as the
    trainers' per_sequence, bit for bit; `exact_token_logprobs` summed over L can differ in the
    last bit once Tp + L >= 8, where NumPy's sum turns pairwise.)
    """
    _, per_sequence = _all_sequences(model, prompts, completions)        # (P·N,)
    return per_sequence.reshape(len(prompts), len(completions))


def exact_token_logprobs(model, prompts, completions):
    """log p(y_t | x, y_<t) of every completion's every token under ``model``, a differentiable
    Tensor (P, N, L): the terms whose sum over t is `exact_logprobs`."""
    P, (N, L) = len(prompts), np.shape(completions)
    per_token, _ = _all_sequences(model, prompts, completions)           # (P·N, Tp+L)
    return per_token[:, per_token.shape[1] - L:].reshape(P, N, L)


def exact_policy(model, prompts, completions):
    """p(y|x) of every completion under ``model`` as a NumPy array (P, N); each row sums to 1."""
    with no_grad():
        logp = exact_logprobs(model, prompts, completions).numpy().astype(np.float64)
    return np.exp(logp)


def optimal_policy(p_ref, R, beta):
    """p*(y|x) = p_ref(y|x)·exp(R(y|x)/β) / Z(x), computed in log space (P, N)."""
    if beta <= 0:
        raise ValueError(f"optimal_policy: beta must be > 0, got {beta}")
    with np.errstate(divide="ignore"):
        logits = np.log(np.asarray(p_ref, dtype=np.float64)) + np.asarray(R) / beta
    logits -= logits.max(axis=-1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=-1, keepdims=True)


def kl(p, q):
    """KL(p ‖ q) = Σ_y p(y) log(p(y)/q(y)) per row (nats), with 0·log 0 = 0: (P, N) -> (P,)."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    return terms.sum(axis=-1)


def exact_objective(logp, ref_logp, R, beta):
    """J = mean over prompts of Σ_y p_θ(y|x)·[R(y|x) - β·(log p_θ(y|x) - log p_ref(y|x))].

    ``logp`` is the Tensor table of `exact_logprobs` (P, N); ``ref_logp`` and ``R`` are arrays.
    ``J.backward()`` gives the exact ∇J that REINFORCE estimates by sampling.
    """
    xp = backend.get_array_module(logp.data)
    ref = xp.asarray(ref_logp, dtype=logp.dtype)
    rewards = xp.asarray(R, dtype=logp.dtype)
    p = logp.exp()
    return (p * (rewards - beta * (logp - ref))).sum(axis=1).mean()


# ===================================================================================================
# sampling


def sample_completions(model, prompts, n_per_prompt, length, rng):
    """Sample ``n_per_prompt`` completions of each prompt from ``model``, token by token.

    Returns prompt_idx (B,) and completions (B, length), B = P·n_per_prompt, grouped by prompt.
    This is autoregressive sampling, as a trainer's ``generate`` does: the logits at the last
    position give p(y_t | x, y_<t), one token is drawn (inverse CDF with the host ``rng``), appended,
    and the model runs again.
    """
    prompts = np.asarray(prompts)
    prompt_idx = np.repeat(np.arange(len(prompts)), n_per_prompt)
    ids = prompts[prompt_idx]                                            # (B, Tp)
    with no_grad():
        for _ in range(length):
            logits = backend.to_numpy(model(ids).data[:, -1]).astype(np.float64)   # (B, V)
            p = np.exp(logits - logits.max(axis=-1, keepdims=True))
            cdf = np.cumsum(p / p.sum(axis=-1, keepdims=True), axis=-1)
            u = rng.random((len(ids), 1))
            nxt = np.minimum((u > cdf).sum(axis=-1), logits.shape[-1] - 1)          # (B,)
            ids = np.concatenate([ids, nxt[:, None]], axis=1)
    return prompt_idx, ids[:, prompts.shape[1]:]


def bradley_terry_pairs(p_ref, R, n_pairs, rng):
    """Preference pairs labelled by the Bradley-Terry model of R.

    For each prompt x, ``n_pairs`` times: draw two different completions y1, y2 from p_ref(·|x)
    (identical ones carry no preference), then y1 is chosen with probability σ(R(y1|x) - R(y2|x)).
    Returns index arrays (M,) into the problem's tables: prompt, chosen, rejected.
    """
    p_ref, R = np.asarray(p_ref, dtype=np.float64), np.asarray(R, dtype=np.float64)
    prompt, chosen, rejected = [], [], []
    for x in range(p_ref.shape[0]):
        q = p_ref[x] / p_ref[x].sum()
        y1 = rng.choice(len(q), size=n_pairs, p=q)
        y2 = rng.choice(len(q), size=n_pairs, p=q)
        while (same := y1 == y2).any():                                  # redraw ties
            y2[same] = rng.choice(len(q), size=int(same.sum()), p=q)
        first_wins = rng.random(n_pairs) < 1 / (1 + np.exp(-(R[x, y1] - R[x, y2])))
        prompt.append(np.full(n_pairs, x))
        chosen.append(np.where(first_wins, y1, y2))
        rejected.append(np.where(first_wins, y2, y1))
    return np.concatenate(prompt), np.concatenate(chosen), np.concatenate(rejected)


# ===================================================================================================
# a policy that can represent every policy of the toy problem


class TabularPolicy(Module):
    """Logits from a table with one row per (prompt, completion prefix): p(y_t | x, y_<t) is free.

    For completions of length L over n tokens there are 1 + n + ... + n^(L-1) prefixes per prompt
    (13 for n = L = 3). ``forward(input_ids)`` looks up, for every position, the row of the prompt
    and the completion tokens so far (an `F.embedding`, so the gradient is the engine's); positions
    inside the prompt before its last token, and the last position, read a spare row that no
    log-prob uses. Prompts are matched exactly against ``prompts``.
    """

    def __init__(self, prompts, n_tokens, length, init_std=1.0, seed=0, dtype="float64"):
        super().__init__()
        self.prompts = np.asarray(prompts)
        self.n_tokens, self.length = n_tokens, length
        self.n_prefixes = sum(n_tokens ** k for k in range(length))
        rows = len(self.prompts) * self.n_prefixes + 1                   # + the spare row
        rng = backend.host_rng(seed)
        self.weight = Parameter((init_std * rng.standard_normal((rows, n_tokens))).astype(dtype))

    def forward(self, input_ids):
        xp = backend.get_array_module(self.weight.data)
        return F.embedding(xp.asarray(self.rows(input_ids)), self.weight)  # (B, T, n_tokens)

    def rows(self, input_ids):
        """The table row each position reads: (B, T) integers."""
        ids = backend.to_numpy(input_ids.data if isinstance(input_ids, Tensor) else input_ids)
        B, T = ids.shape
        Tp = self.prompts.shape[1]
        match = (ids[:, None, :Tp] == self.prompts[None]).all(axis=-1)    # (B, P)
        if not match.any(axis=1).all():
            raise ValueError("TabularPolicy: an input does not start with one of its prompts")
        prompt = match.argmax(axis=1)                                    # (B,)

        spare = self.weight.shape[0] - 1
        rows = np.full((B, T), spare)
        code, offset = np.zeros(B, dtype=np.int64), 0                    # the prefix read so far
        for k in range(min(self.length, T - Tp + 1)):                    # position Tp-1+k predicts y_k
            rows[:, Tp - 1 + k] = prompt * self.n_prefixes + offset + code
            if Tp + k < T:
                code = code * self.n_tokens + ids[:, Tp + k]
            offset += self.n_tokens ** k
        return rows


class TabularValue(TabularPolicy):
    """PPO's critic on the toy problem: one free value V(x, y_<t) per (prompt, completion prefix).

    ``forward(input_ids)`` -> (B, T), aligned like `minirlhf.model.ValueModel`: ``values[:, t]`` is
    the value of the prefix before token t (read at position t-1), 0 at t = 0. Starts at 0.
    """

    def __init__(self, prompts, n_tokens, length, dtype="float64"):
        super().__init__(prompts, n_tokens, length, init_std=0.0, dtype=dtype)
        self.weight = Parameter(np.zeros((self.weight.shape[0], 1), dtype=dtype))

    def forward(self, input_ids):
        xp = backend.get_array_module(self.weight.data)
        v = F.embedding(xp.asarray(self.rows(input_ids)), self.weight)     # (B, T, 1)
        B, T = v.shape[:2]
        first = Tensor.from_array(xp.zeros((B, 1), dtype=v.dtype))
        return ops.concatenate([first, v[:, :-1, 0]], axis=1)            # (B, T)


# ===================================================================================================
# the experiments: each loop calls the library's losses exactly as the trainers do


def train_reinforce(policy, ref, problem, steps=300, n_per_prompt=32, lr=0.05, baseline="loo",
                    seed=0, log=None):
    """REINFORCE with KL, by sampling: y ~ p_θ(·|x), R from the table, `reinforce_kl_loss`.

    Each step samples ``n_per_prompt`` completions per prompt, scores them with
    `sequence_logprobs` under the policy and the frozen reference, and takes one AdamW step on
    the surrogate loss (the leave-one-out baseline is taken within each prompt's group). The
    learning rate decays by a cosine to lr/20, so the sampling noise averages out at the end.
    """
    rng = np.random.default_rng(seed)
    optimizer = AdamW(policy.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    for step in range(steps):
        prompt_idx, ys = sample_completions(policy, problem.prompts, n_per_prompt, problem.length, rng)
        ids, mask = make_sequences(problem.prompts[prompt_idx], ys)
        rewards = problem.R[prompt_idx, completion_index(ys, problem.n_tokens)]
        _, logp = sequence_logprobs(policy, ids, mask)                  # (B,)
        with no_grad():
            _, ref_logp = sequence_logprobs(ref, ids, mask)
        loss, metrics = reinforce_kl_loss(logp, ref_logp, rewards, problem.beta,
                                          baseline=baseline, group=prompt_idx)
        optimizer.lr = lr_schedule(step, lr, 0, steps, min_lr=lr / 20)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if log is not None:
            log(step, metrics)
    return policy


def train_ppo(policy, ref, value, problem, steps=300, n_per_prompt=32, lr=0.05, ppo_epochs=4,
              num_minibatches=2, epsilon=0.2, vf_coef=1.0, lam=0.95, seed=0, log=None):
    """PPO as InstructGPT ran it, on the toy problem: the k1 KL in a per-token reward, GAE, whitened
    advantages, epochs of minibatches of the clipped surrogate plus the clipped value loss.

    Each step samples ``n_per_prompt`` completions per prompt from the policy (p_old), keeps their
    per-token log p_old, log p_ref and V_old, builds the rewards -β·k1_t (+ R at the last token)
    with `kl_penalty_rewards`, the advantages with `gae` (γ = 1) and `masked_whiten`, then takes
    ``ppo_epochs`` x ``num_minibatches`` AdamW steps on `clipped_surrogate` + vf_coef·`value_loss`.
    Policy and value have their own optimiser; the learning rate decays by a cosine to lr/20.
    """
    rng = np.random.default_rng(seed)
    optimizer = AdamW(policy.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    value_optimizer = AdamW(value.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    n = len(problem.prompts) * n_per_prompt
    size = n // num_minibatches
    for step in range(steps):
        prompt_idx, ys = sample_completions(policy, problem.prompts, n_per_prompt, problem.length, rng)
        ids, mask = make_sequences(problem.prompts[prompt_idx], ys)
        scores = problem.R[prompt_idx, completion_index(ys, problem.n_tokens)]
        with no_grad():
            old_logp = sequence_logprobs(policy, ids, mask)[0].numpy()      # (B, T)
            ref_logp = sequence_logprobs(ref, ids, mask)[0].numpy()
            old_values = value(ids).numpy() * mask
        keep = mask != 0                                                    # (B, T) completion tokens
        rewards = kl_penalty_rewards(scores, old_logp, ref_logp, keep, problem.beta, "k1")
        advantages, returns = gae(rewards, old_values, keep, gamma=1.0, lam=lam)
        advantages = masked_whiten(advantages, keep)
        optimizer.lr = value_optimizer.lr = lr_schedule(step, lr, 0, steps, min_lr=lr / 20)
        for _ in range(ppo_epochs):
            order = rng.permutation(n)
            for i in range(0, n, size):
                mb = order[i:i + size]
                logp, _ = sequence_logprobs(policy, ids[mb], mask[mb])
                per_token, metrics = clipped_surrogate(logp, old_logp[mb], advantages[mb], keep[mb],
                                                       epsilon_low=epsilon)
                vf_loss, _ = value_loss(value(ids[mb]), old_values[mb], returns[mb], keep[mb])
                loss = masked_mean(per_token, keep[mb]) + vf_coef * vf_loss
                optimizer.zero_grad()
                value_optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                value_optimizer.step()
        if log is not None:
            log(step, {**metrics, "reward": float(scores.mean())})
    return policy


def train_dpo(policy, ref, problem, pairs, steps=300, lr=0.05, beta=None, log=None,
              loss_type="sigmoid"):
    """DPO on fixed preference pairs (prompt, chosen, rejected index arrays), full batch.

    Every completion's log-prob comes from one `exact_logprobs` pass over the P·N sequences
    (a pair is two rows of that table), so each step uses the exact gradient of the DPO loss of
    all pairs. Reference log-probs are computed once, as in a DPO trainer. ``loss_type="ipo"`` trains
    IPO instead (`dpo_loss`).
    """
    beta = problem.beta if beta is None else beta
    prompt, chosen, rejected = pairs

    def loss(table, ref_table):
        return dpo_loss(table[prompt, chosen], table[prompt, rejected], ref_table[prompt, chosen],
                        ref_table[prompt, rejected], beta=beta, loss_type=loss_type)
    return train_on_table(policy, ref, problem, loss, steps, lr, log)


def train_on_table(policy, ref, problem, loss_of_table, steps=300, lr=0.05, log=None):
    """Minimise ``loss_of_table(table, ref_table)`` (a scalar Tensor, or ``(loss, metrics)``) of the
    policy's exact log-prob table (P, N), a Tensor, and the reference's (an array, computed once):
    AdamW, full batch, the learning rate decaying by a cosine to lr/20."""
    with no_grad():
        ref_table = exact_logprobs(ref, problem.prompts, problem.completions).numpy()
    optimizer = AdamW(policy.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    for step in range(steps):
        table = exact_logprobs(policy, problem.prompts, problem.completions)   # (P, N)
        out = loss_of_table(table, ref_table)
        loss, metrics = out if isinstance(out, tuple) else (out, {})
        optimizer.lr = lr_schedule(step, lr, 0, steps, min_lr=lr / 20)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if log is not None:
            log(step, metrics)
    return policy


def train_reward_table(problem, pairs, steps=300, lr=0.1, log=None):
    """A Bradley-Terry reward model with one free scalar r(x, y) per pair, trained by `bt_loss`.

    The Bradley-Terry likelihood only sees differences r(y_w|x) - r(y_l|x), so r is identified up
    to a constant per prompt: compare it with R after centering each prompt's row.
    """
    prompt, chosen, rejected = pairs
    r = Parameter(np.zeros(problem.R.shape))                              # (P, N)
    optimizer = AdamW([r], lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    for step in range(steps):
        loss, metrics = bt_loss(r[prompt, chosen], r[prompt, rejected])
        optimizer.lr = lr_schedule(step, lr, 0, steps, min_lr=lr / 20)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if log is not None:
            log(step, metrics)
    return r.numpy()


def centered_pearson(r, R):
    """Pearson correlation of r and R after subtracting each prompt's mean (row) from both."""
    a = np.asarray(r, dtype=np.float64)
    b = np.asarray(R, dtype=np.float64)
    a = (a - a.mean(axis=1, keepdims=True)).ravel()
    b = (b - b.mean(axis=1, keepdims=True)).ravel()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


# ===================================================================================================
# the REINFORCE estimator against the exact gradient


def flat_gradient(params, loss_fn):
    """∇ loss_fn() with respect to ``params``, as one float64 NumPy vector: each parameter's
    gradient raveled, in order (zeros for a parameter the loss does not reach). The parameters'
    ``.grad`` is cleared before the backward pass and left empty after it."""
    for p in params:
        p.grad = None
    loss_fn().backward()
    grad = np.concatenate([backend.to_numpy(p.grad).ravel().astype(np.float64) if p.grad is not None
                           else np.zeros(p.size) for p in params])
    for p in params:
        p.grad = None
    return grad


def exact_gradient(policy, ref, problem):
    """∇_θ J by autograd through the exact probability table, flattened over the parameters."""
    with no_grad():
        ref_logp = exact_logprobs(ref, problem.prompts, problem.completions).numpy()
    def J():
        return exact_objective(exact_logprobs(policy, problem.prompts, problem.completions),
                               ref_logp, problem.R, problem.beta)

    return flat_gradient(policy.parameters(), J)


def reinforce_gradients(policy, ref, problem, n_batches, n_per_prompt, seed=0, baseline="none"):
    """``n_batches`` independent REINFORCE estimates of ∇J, as rows (n_batches, n_params).

    Each is ``-∇ reinforce_kl_loss`` on a fresh batch of ``n_per_prompt`` samples per prompt; the
    mean over prompts of the per-prompt means is what J averages, so E[row] = ∇J exactly for
    ``baseline="none"`` and ``"loo"``.
    """
    rng = np.random.default_rng(seed)
    params = policy.parameters()
    rows = []
    for _ in range(n_batches):
        prompt_idx, ys = sample_completions(policy, problem.prompts, n_per_prompt, problem.length, rng)
        ids, mask = make_sequences(problem.prompts[prompt_idx], ys)
        rewards = problem.R[prompt_idx, completion_index(ys, problem.n_tokens)]
        _, logp = sequence_logprobs(policy, ids, mask)
        with no_grad():
            _, ref_logp = sequence_logprobs(ref, ids, mask)
        loss, _ = reinforce_kl_loss(logp, ref_logp, rewards, problem.beta, baseline=baseline,
                                    group=prompt_idx)
        rows.append(-flat_gradient(params, lambda: loss))
    return np.stack(rows)
