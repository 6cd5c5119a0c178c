"""Best-of-n: sample n replies from the reference, keep the one the reward model likes best.

The simplest aligned policy, and the baseline of InstructGPT and of Gao et al.'s "Scaling laws for
reward model overoptimization" (2022). No training: its only knob is n, and its only cost is
sampling. Its distribution has a closed form. Order the completions by reward; write, for a reward
value r,

    F(r)  = P_ref(R(y) <= r),      F⁻(r) = P_ref(R(y) < r),      m(r) = F(r) - F⁻(r)

(m is the mass of the *tie class* of r: every completion whose reward is exactly r). The best of n
independent draws has a reward in that class when all n draws lie at or below r but not all strictly
below: probability F^n - F⁻^n. Within the class, the draws that reach r are independent draws of
p_ref restricted to it, so whichever of them is kept (the first, uniformly, any rule blind to the
completions themselves) is distributed as p_ref within the class:

    π_bon(y) = p_ref(y) · w(r),      w(r) = (F(r)^n - F⁻(r)^n) / (F(r) - F⁻(r)),   r = R(y).

The ratio π_bon/p_ref is constant within a class, so

    KL(π_bon ‖ p_ref) = Σ_classes (F^n - F⁻^n) · log w.

The famous formula ``log n - (n-1)/n`` (`analytic_kl`) is this KL when the reward of a draw has no
atoms (a continuous distribution): then U = F(R(y)) is uniform, the kept one has density
g(u) = n·u^(n-1), and ∫₀¹ g log g du = log n - (n-1)/n. A class of mass m is the interval
[F⁻, F] of u merged into one point; merging can only lose information (the log-sum inequality), so

    analytic - exact = Σ_classes gap(F⁻, F),
    gap(a, b) = ∫ₐᵇ g log g du - (bⁿ - aⁿ)·log((bⁿ - aⁿ)/(b - a))  >=  0,

zero only for a class of no mass (`class_gap`). Each gap is O(m³) for a small class (the variance
of g over the interval), so a distribution of many small classes is near the formula and a few heavy
ties make it overstate the KL (Beirami et al. 2024: it is an upper bound).

On a real model, F is unknown, so `tie_corrected_kl` estimates the KL from a pool of reference
samples: the formula minus the gaps of the tie classes the pool reveals, each class with its exact
mass (from the sampler's log-probs) and its place in the reward order from the pool's ranks.

`best_of_n` samples n replies per prompt with the KV cache (all n of a prompt in one batch) and
keeps the best; a tie is won by the first sampled of the tied replies. The n draws are exchangeable,
so that rule has the same distribution as a uniform pick among them.
"""

import math
from dataclasses import dataclass

import numpy as np

from .train.rollout import sample_sequences

# ===================================================================================================
# the KL of best-of-n, three ways


def analytic_kl(n):
    """log n - (n-1)/n: the KL of best-of-n to its reference when rewards have no atoms (ties)."""
    _check_n(n)
    return math.log(n) - (n - 1) / n


def tie_classes(p_ref, R):
    """The tie classes of one prompt in reward order: (masses m (K,), F⁻ (K,), F (K,), the class of
    each completion (N,)). Completions of exactly equal reward form one class."""
    p_ref, R = np.asarray(p_ref, dtype=np.float64), np.asarray(R, dtype=np.float64)
    values, cls = np.unique(R, return_inverse=True)                # sorted rewards, class of each y
    m = np.bincount(cls.ravel(), weights=p_ref.ravel(), minlength=len(values))   # (K,)
    F = np.minimum(np.cumsum(m), 1.0)                              # (K,) P(R <= r_k)
    below = np.concatenate([[0.0], F[:-1]])                        # (K,) P(R < r_k)
    return m, below, F, cls.ravel()


def _log_top_mass(lo, hi, n):
    """log(hiⁿ - loⁿ) for 0 <= lo < hi, stable when hi - lo is tiny: hiⁿ·(1 - (lo/hi)ⁿ)."""
    with np.errstate(divide="ignore", invalid="ignore"):          # lo = 0: log1p(-1) = -inf
        return n * np.log(hi) + np.log(-np.expm1(n * np.log1p(-(hi - lo) / hi)))


def _bon_weights(lo, hi, n):
    """log w = log((hiⁿ - loⁿ)/(hi - lo)) of each class (the log of π_bon/p_ref on it)."""
    return _log_top_mass(lo, hi, n) - np.log(hi - lo)


def bon_probabilities(p_ref, R, n):
    """π_bon(y|x) of every completion (P, N), from p_ref (P, N) and the rewards R (P, N), ties
    included (module docstring). Each row sums to 1."""
    _check_n(n)
    p_ref, R = np.atleast_2d(p_ref), np.atleast_2d(R)
    out = np.zeros(p_ref.shape)
    for x in range(p_ref.shape[0]):
        m, lo, hi, cls = tie_classes(p_ref[x], R[x])
        keep = m > 0
        log_w = np.full(len(m), -np.inf)
        log_w[keep] = _bon_weights(lo[keep], hi[keep], n)
        out[x] = p_ref[x] * np.exp(log_w[cls])
    return out


def exact_kl(p_ref, R, n):
    """KL(π_bon ‖ p_ref) per prompt (P,), exactly: Σ_classes (Fⁿ - F⁻ⁿ)·log w."""
    _check_n(n)
    p_ref, R = np.atleast_2d(p_ref), np.atleast_2d(R)
    kls = []
    for x in range(p_ref.shape[0]):
        m, lo, hi, _ = tie_classes(p_ref[x], R[x])
        keep = m > 0
        lo, hi = lo[keep], hi[keep]
        kls.append(float(np.sum(np.exp(_log_top_mass(lo, hi, n)) * _bon_weights(lo, hi, n))))
    return np.array(kls)


def _g_log_g_integral(u, n):
    """G(u) = ∫₀ᵘ g log g, g = n·t^(n-1): uⁿ(log n + (n-1) log u) - (n-1)uⁿ/n (G(0) = 0)."""
    u = np.asarray(u, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        value = u ** n * (math.log(n) + (n - 1) * np.log(u)) - (n - 1) * u ** n / n
    return np.where(u > 0, value, 0.0)


def class_gap(lo, hi, n):
    """How much `analytic_kl` overstates the KL for one tie class spanning [lo, hi] of the
    reference's reward CDF: ∫ g log g over it minus (hiⁿ - loⁿ)·log w (>= 0, 0 when lo = hi)."""
    lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    merged = np.zeros(np.broadcast(lo, hi).shape)
    wide = hi > lo
    lo_w, hi_w = np.broadcast_to(lo, wide.shape)[wide], np.broadcast_to(hi, wide.shape)[wide]
    merged[wide] = np.exp(_log_top_mass(lo_w, hi_w, n)) * _bon_weights(lo_w, hi_w, n)
    return _g_log_g_integral(hi, n) - _g_log_g_integral(lo, n) - merged


def tie_corrected_kl(n, scores, masses, keys=None):
    """The sampled estimate of KL(π_bon ‖ p_ref) for one prompt, from a pool of reference samples.

    ``scores`` (M,): the reward of each pooled sample; ``masses`` (M,): its exact probability under
    the reference (exp of its log-prob); ``keys`` (M,): what makes two samples the same completion
    (default: the score). Samples of one key count once; samples of one score form a tie class, of
    mass the sum of its completions'. Each class's place is estimated from the pool,
    F⁻ ≈ (#samples scored below it)/M, and the estimate is

        analytic_kl(n) - Σ_classes class_gap(F⁻, F⁻ + m).

    Completions the pool never drew count as having no atom; their gaps are left out, so for a
    heavy unseen tie the estimate errs upwards, towards the formula.
    """
    scores = np.asarray(scores, dtype=np.float64)
    masses = np.asarray(masses, dtype=np.float64)
    keys = scores if keys is None else list(keys)
    first = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    distinct = np.array(sorted(first.values()))                    # one sample per completion
    values, cls = np.unique(scores[distinct], return_inverse=True)
    m = np.bincount(cls, weights=masses[distinct], minlength=len(values))           # (K,)
    below = np.searchsorted(np.sort(scores), values, side="left") / len(scores)      # (K,) F⁻
    m = np.minimum(m, 1.0)
    lo = np.minimum(below, 1.0 - m)
    return analytic_kl(n) - float(np.sum(class_gap(lo, lo + m, n)))


def kl_table(p_ref, R, ns, pool=3000, repeats=8, seed=0):
    """KL(π_bon ‖ p_ref) three ways for each n, averaged over the prompts: one dict per n with
    ``analytic`` (`analytic_kl`), ``exact`` (`exact_kl`, from p_ref and R) and ``sampled``
    (`tie_corrected_kl` from ``repeats`` pools of ``pool`` draws of p_ref per prompt, as
    `minirlhf bon` has them on a model: the drawn completions' scores and exact masses), with its
    standard error ``sampled_se`` over the repeats."""
    p_ref, R = np.atleast_2d(p_ref), np.atleast_2d(R)
    rng = np.random.default_rng(seed)
    draws = [[rng.choice(p_ref.shape[1], size=pool, p=p_ref[x] / p_ref[x].sum())
              for x in range(p_ref.shape[0])] for _ in range(repeats)]     # (repeats, P) pools
    rows = []
    for n in ns:
        sampled = np.array([np.mean([tie_corrected_kl(n, R[x, y], p_ref[x, y], keys=y)
                                     for x, y in enumerate(pools)]) for pools in draws])
        rows.append({"n": n, "analytic": analytic_kl(n), "exact": float(exact_kl(p_ref, R, n).mean()),
                     "sampled": float(sampled.mean()),
                     "sampled_se": float(sampled.std(ddof=1) / math.sqrt(repeats)) if repeats > 1 else None})
    return rows


def _check_n(n):
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"best-of-n needs an integer n >= 1, got {n!r}")


# ===================================================================================================
# best-of-n on a model


@dataclass
class BestOfN:
    """What `best_of_n` returns, for P prompts and n samples each.

    ``chosen`` (P,): the index of the kept sample; ``replies``: its tokens (P lists);
    ``rewards`` (P,): its score; ``scores`` (P, n): every sample's score; ``samples``: every
    sample's tokens (P lists of n); ``logprobs`` (P, n): log p(y|x) of each sample under the
    sampler (the sum over its generated tokens); ``sequences``: ``(ids, n_prompt)`` of each sample
    as it was scored (P lists of n), ending with EOT.
    """

    chosen: np.ndarray
    replies: list
    rewards: np.ndarray
    scores: np.ndarray
    samples: list
    logprobs: np.ndarray
    sequences: list

    def select(self, n):
        """The best of the first ``n`` samples of each prompt: (chosen (P,), rewards (P,)).

        The first n of n_max exchangeable draws are n draws, so one pool serves every smaller n
        (nested: the best of 4 is never worse than the best of 2)."""
        _check_n(n)
        if n > self.scores.shape[1]:
            raise ValueError(f"select: only {self.scores.shape[1]} samples per prompt, asked for {n}")
        chosen = np.argmax(self.scores[:, :n], axis=1)             # a tie: the first sampled wins
        return chosen, self.scores[np.arange(len(chosen)), chosen]


def best_of_n(policy, prompts, n, reward, max_new_tokens, eot_id, seed=None, max_rows=512):
    """Sample ``n`` replies to each prompt from ``policy`` (temperature 1) and keep the best.

    ``prompts``: token-id lists. ``reward(sequences)`` -> (N,) scores, for ``(ids, n_prompt)``
    sequences ending with EOT (appended to a reply that reached ``max_new_tokens``, as rl scores its
    samples). All n samples of a prompt are in one batch of the shared rollout sampler
    (`minirlhf.train.rollout.sample_sequences`: `generate` with the KV cache); prompts are taken
    ``max_rows // n`` at a time (at least one). ``seed``: an int, None or a
    ``numpy.random.Generator``; one seed and one ``max_rows`` give the same samples and the same
    choice (the batches draw from the generator in turn).
    """
    _check_n(n)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    per_batch = max(1, max_rows // n)
    samples, logprobs, sequences, scores = [], [], [], []
    for i in range(0, len(prompts), per_batch):
        group = prompts[i:i + per_batch]
        seqs, truncated, lp = sample_sequences(policy, group, n, max_new_tokens, eot_id, rng)
        r = np.asarray(reward(seqs), dtype=np.float64)             # (len(group)·n,)
        for j in range(len(group)):
            block = slice(j * n, (j + 1) * n)
            # each reply as sampled: the EOT appended to a truncated one is not part of it
            samples.append([ids[k:len(ids) - 1 if cut else None]
                            for (ids, k), cut in zip(seqs[block], truncated[block])])
            logprobs.append(lp[block])
            sequences.append(seqs[block])
            scores.append(r[block])
    scores = np.array(scores).reshape(len(prompts), n)             # (P, n)
    result = BestOfN(None, None, None, scores, samples, np.array(logprobs).reshape(len(prompts), n),
                     sequences)
    chosen, rewards = result.select(n)
    result.chosen, result.rewards = chosen, rewards
    result.replies = [samples[p][c] for p, c in enumerate(chosen)]
    return result
