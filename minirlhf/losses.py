"""The math of RLHF, one loss per function, each beside its equation.

Names follow the lecture: ``x`` a prompt, ``y`` a completion, ``p_θ`` the policy being trained,
``p_ref`` the frozen reference (the SFT model), ``R(y|x)`` a reward, ``beta`` (β) the strength of the
KL leash, ``chosen`` (y_w) and ``rejected`` (y_l) the two sides of a preference pair. Log-probs of
whole completions come from `minirlhf.logprobs.sequence_logprobs` (sums over completion tokens).

    sft_loss           supervised fine-tuning: next-token NLL on completion tokens
    bt_loss            Bradley-Terry reward model: -mean log σ(r_w - r_l)
    kl_k1, kl_k2, kl_k3, kl_per_sequence
                       Schulman's estimators of KL(p_θ ‖ p_ref) from samples of p_θ
    reinforce_kl_loss  REINFORCE on the KL-regularised reward R - β·(log p_θ - log p_ref)
    dpo_loss           direct preference optimisation (cDPO, IPO and TRL's other loss types)
    kto_loss, apo_zero_unpaired, cpo_loss, simpo_loss, orpo_loss
                       the rest of the preference family, defined in `minirlhf.preference`
    masked_mean, masked_var, masked_whiten, clipped_surrogate, kl_penalty_rewards, gae, value_loss
                       PPO as InstructGPT ran it: per-token KL reward, GAE, clipped policy and value
    group_advantages, aggregate_tokens, grpo_loss
                       GRPO as TRL runs it: group-standardised advantages, each variant's
                       weighing of tokens, the clipped surrogate plus β·k3 in the loss
    check_beta         the check of β that every loss and trainer config shares

Losses that report something return ``(loss, metrics)``, metrics being a dict of Python floats under
the names TRL logs, so runs can be compared with it.
"""

import math

from . import backend
from . import functional as F
from . import ops
from .logprobs import completion_positions
from .tensor import Tensor, array_of

# ===================================================================================================
# helpers


def _float(a):
    return float(a.item()) if hasattr(a, "item") else float(a)


def check_beta(beta, fn=None, allow_zero=False):
    """β as a float, refused (ValueError) unless finite and positive (or 0, with ``allow_zero``):
    the losses and the trainers' configs all check it here."""
    beta = float(beta)
    if not (beta >= 0 if allow_zero else beta > 0) or not math.isfinite(beta):
        need = "beta must be >= 0 and finite" if allow_zero else "beta must be positive and finite (beta > 0)"
        where = f"{fn}: " if fn else ""
        raise ValueError(f"{where}{need}: β weighs the KL to the reference; got {beta}")
    return beta


def _zero_outside(x, keep):
    """``x`` where ``keep`` is true, else 0, for a Tensor (a graph node) or an array alike: the one
    place in this file that tells them apart, so that every masked formula is written once."""
    if isinstance(x, Tensor):
        return ops.where(keep, x, 0.0)
    return backend.get_array_module(keep).where(keep, x, 0)


def _check_keep(fn, keep, shape):
    """``keep`` must be a boolean array of ``shape``: the tokens in the sum, made once by the
    caller (``completion_mask != 0``)."""
    if getattr(keep, "dtype", None) != bool or tuple(keep.shape) != tuple(shape):
        raise ValueError(f"{fn}: keep must be a boolean array of shape {tuple(shape)} (the tokens "
                         f"that count), got {getattr(keep, 'dtype', type(keep).__name__)} "
                         f"{tuple(getattr(keep, 'shape', ()))}")


def _check_same_shape(fn, **arrays):
    shapes = {name: tuple(a.shape) for name, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{n} {s}" for n, s in shapes.items())
        raise ValueError(f"{fn}: inputs must have one shape, got {listed}")


# ===================================================================================================
# supervised fine-tuning


def sft_loss(logits, input_ids, completion_mask):
    """Mean next-token negative log-likelihood over the completion tokens of the batch.

        L_SFT = -(1/N) Σ_{b,t} m[b,t] · log p_θ(y[b,t] | x, y[b,<t]),    N = Σ_{b,t} m[b,t]

    with m = ``completion_mask``: the prompt and the padding are context, never targets. Token t is
    scored by the logits at t-1 (see `minirlhf.logprobs`), so this is ``F.cross_entropy`` of
    ``logits[:, :-1]`` against ``input_ids[:, 1:]``, ignoring positions whose mask is 0. The mean is
    over tokens, not sequences: every completion token counts once, as in a pre-training loss.
    """
    xp = backend.get_array_module(logits.data)
    ids = array_of(input_ids, xp)
    if ids.ndim != 2 or logits.shape[:2] != tuple(ids.shape):
        raise ValueError(f"sft_loss: logits {logits.shape} and input_ids {tuple(ids.shape)} must be "
                         "(B, T, V) and (B, T)")
    keep = completion_positions(completion_mask, ids.shape, xp, "input_ids")   # (B, T) bool
    if not bool(keep.any()):
        raise ValueError("sft_loss: the batch has no completion tokens (completion_mask is all 0)")
    targets = xp.where(keep[:, 1:], ids[:, 1:], -100)                    # (B, T-1)
    return F.cross_entropy(logits[:, :-1], targets, ignore_index=-100)


# ===================================================================================================
# reward model


def bt_loss(r_chosen, r_rejected, margin=0.0):
    """Bradley-Terry loss of a reward model on preference pairs.

    The Bradley-Terry model says a person prefers y_w to y_l with probability σ(r(y_w) - r(y_l)).
    Its negative log-likelihood on pairs (chosen = y_w, rejected = y_l) is

        L_BT = -mean log σ(r_w - r_l - margin)

    ``margin`` (a float or one per pair, as Llama 2 does for "significantly better") asks the
    reward gap to exceed it. Metrics: ``accuracy`` = fraction of pairs with r_w > r_l,
    ``margin`` = mean(r_w - r_l) (the gap itself, not the argument).
    """
    _check_same_shape("bt_loss", r_chosen=r_chosen, r_rejected=r_rejected)
    diff = r_chosen - r_rejected                                         # (B,) a Tensor
    if not isinstance(diff, Tensor):
        raise TypeError("bt_loss: r_chosen or r_rejected must be a Tensor (the reward model's output)")
    xp = backend.get_array_module(diff.data)
    m = xp.asarray(margin, dtype=diff.dtype)                             # a constant
    loss = -F.logsigmoid(diff - m).mean()

    d = diff.data
    metrics = {"accuracy": _float((d > 0).mean()), "margin": _float(d.mean())}
    return loss, metrics


def ranking_to_pairs(ranked):
    """All K(K-1)/2 (chosen, rejected) pairs of a ranking of K responses listed best first.

    InstructGPT ranks K responses per prompt and trains on every pair; ``ranked[i]`` beats
    ``ranked[j]`` whenever i < j. (InstructGPT also puts all pairs of one prompt in one batch, so
    that each ranking counts once and is not over-fitted.)
    """
    ranked = list(ranked)
    return [(ranked[i], ranked[j]) for i in range(len(ranked)) for j in range(i + 1, len(ranked))]


# ===================================================================================================
# KL estimators


def _log_ratio(logp, ref_logp):
    """log r = log p_ref - log p_θ: a Tensor if either input is one, else an array."""
    _check_same_shape("kl", logp=logp, ref_logp=ref_logp)
    return ref_logp - logp


def kl_k1(logp, ref_logp):
    """k1 = -log r = log p_θ - log p_ref, with r = p_ref / p_θ and y ~ p_θ.

    Unbiased (E_p_θ[-log r] = KL(p_θ ‖ p_ref)) but single samples can be negative: a noisy estimate.
    The estimators take Tensors (differentiable: a loss's KL term) and arrays (a rollout's reward,
    a metric) alike: each is written once, with operators both understand.
    """
    return -_log_ratio(logp, ref_logp)


def kl_k2(logp, ref_logp):
    """k2 = ½ (log r)²: always >= 0, low variance, biased (exact to second order in log r)."""
    lr = _log_ratio(logp, ref_logp)
    return 0.5 * (lr * lr)


def kl_k3(logp, ref_logp):
    """k3 = (r - 1) - log r, r = p_ref / p_θ: unbiased (E_p_θ[r] = 1) and always >= 0.

    ``r - 1 - log r >= 0`` because log is concave (log r <= r - 1); it adds to k1 the control
    variate r - 1, whose mean is 0, and so has far less variance than k1 when p_θ ≈ p_ref.
    """
    lr = _log_ratio(logp, ref_logp)
    k3 = F.KLk3()                         # its forward is the formula, on an array or as a node
    return k3(lr) if isinstance(lr, Tensor) else k3.forward(lr)


_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}
KL_ESTIMATORS = tuple(_ESTIMATORS)         # the names `kl_per_sequence` and `kl_penalty_rewards` take


def _estimator(fn, name):
    if name not in _ESTIMATORS:
        raise ValueError(f"{fn}: estimator must be one of {', '.join(KL_ESTIMATORS)}, got {name!r}")
    return _ESTIMATORS[name]


def kl_per_sequence(logp, ref_logp, keep, estimator="k1"):
    """Σ_t keep[:, t] · k(logp[:, t], ref_logp[:, t]): an estimate of KL per sequence, (B, T) -> (B,).

    With ``estimator="k1"`` this is log p_θ(y|x) - log p_ref(y|x) of the sampled completion, whose
    mean over y ~ p_θ is KL(p_θ(·|x) ‖ p_ref(·|x)) (the KL of sequences is the sum of the per-token
    KLs along the sampled path). k2 and k3 are applied per token, then summed.
    """
    k = _estimator("kl_per_sequence", estimator)(logp, ref_logp)       # (B, T)
    _check_keep("kl_per_sequence", keep, k.shape)
    return _zero_outside(k, keep).sum(axis=-1)


# ===================================================================================================
# REINFORCE with a KL penalty


BASELINES = ("none", "mean", "loo")       # the baselines `reinforce_kl_loss` takes


def reinforce_kl_loss(logp_seq, ref_logp_seq, rewards, beta, baseline="mean", group=None):
    """REINFORCE on the KL-regularised objective J(θ) = E_{y~p_θ}[R(y|x)] - β·KL(p_θ ‖ p_ref).

    Per sampled completion, the shaped reward is a **constant** (computed from detached values):

        R̂(y) = R(y|x) - β·(log p_θ(y|x) - log p_ref(y|x))

    and the surrogate loss is

        L = -mean[(R̂(y) - b) · log p_θ(y|x)]

    Why R̂ is a constant: ∇J = E[R̂ ∇log p_θ(y)] - β·E[∇log p_θ(y)], and the last term is 0
    (Σ_y ∇p_θ(y) = ∇1 = 0). So the KL reaches the gradient only through the score function
    ∇log p_θ, as part of R̂: -∇L is an unbiased estimate of ∇J (for b independent of y).

    ``baseline`` b, which leaves the mean unchanged and lowers the variance:
      * ``"none"``: b = 0 (plain REINFORCE);
      * ``"mean"``: the mean of R̂ over the batch, or over the samples of the same prompt when
        ``group`` (one prompt id per sample) is given. It includes the sample itself, which
        shrinks the expected gradient by a factor (n-1)/n;
      * ``"loo"``: leave-one-out (RLOO): for sample i, the mean of R̂ over the *other* samples of
        its prompt (``group``) or of the batch; unbiased, and needs 2+ samples per group.

    ``beta``: β >= 0; β = 0 is plain REINFORCE on R and is allowed here (command lines that exist to
    train against a reference ask for β > 0 themselves). Negative β raises ValueError.

    Returns ``(loss, metrics)``: ``reward`` = mean R, ``kl`` = mean of log p_θ - log p_ref per
    sequence (k1), ``reward_with_kl`` = mean R̂, ``advantage/mean``, ``advantage/std``.
    """
    beta = check_beta(beta, "reinforce_kl_loss", allow_zero=True)
    if baseline not in BASELINES:
        raise ValueError(f"reinforce_kl_loss: baseline must be one of {', '.join(BASELINES)}, "
                         f"got {baseline!r}")
    if not isinstance(logp_seq, Tensor):
        raise TypeError("reinforce_kl_loss: logp_seq must be a Tensor (the policy's log p_θ(y|x))")
    xp = backend.get_array_module(logp_seq.data)
    logp = logp_seq.data
    ref = array_of(ref_logp_seq, xp).astype(logp.dtype)
    R = array_of(rewards, xp).astype(logp.dtype)
    if logp.ndim != 1:
        raise ValueError(f"reinforce_kl_loss: expected one log-prob per sequence (B,), got {logp.shape}")
    _check_same_shape("reinforce_kl_loss", logp_seq=logp, ref_logp_seq=ref, rewards=R)

    kl = logp - ref                                                      # (B,) k1 per sequence
    shaped = R - beta * kl                                               # (B,) R̂, a constant
    b = _baseline(shaped, baseline, group, xp)                           # (B,)
    advantage = shaped - b
    loss = -(ops.as_tensor(advantage, like=logp_seq) * logp_seq).mean()

    metrics = {"reward": _float(R.mean()), "kl": _float(kl.mean()),
               "reward_with_kl": _float(shaped.mean()),
               "advantage/mean": _float(advantage.mean()), "advantage/std": _float(advantage.std())}
    return loss, metrics


def _baseline(shaped, kind, group, xp):
    """b for each sample: 0, the (group) mean of R̂, or the leave-one-out (group) mean."""
    if kind == "none":
        return xp.zeros_like(shaped)
    n = shaped.shape[0]
    if group is None:
        sums = xp.full_like(shaped, shaped.sum())
        counts = xp.full_like(shaped, n)
    else:
        g = array_of(group, xp)
        if tuple(g.shape) != (n,):
            raise ValueError(f"reinforce_kl_loss: group must have shape ({n},), got {tuple(g.shape)}")
        _, inverse = xp.unique(g, return_inverse=True)
        inverse = inverse.reshape(-1)
        one_hot = (inverse[:, None] == xp.arange(int(inverse.max()) + 1)[None, :])   # (B, G)
        one_hot = one_hot.astype(shaped.dtype)
        sums = one_hot @ (one_hot.T @ shaped)                            # Σ of R̂ over i's group
        counts = one_hot @ one_hot.sum(axis=0)                           # size of i's group
    if kind == "mean":
        return sums / counts
    if bool((counts < 2).any()):
        raise ValueError("reinforce_kl_loss: the leave-one-out baseline needs at least 2 samples "
                         "per prompt (group)")
    return (sums - shaped) / (counts - 1)


# ===================================================================================================
# direct preference optimisation


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta=0.1, label_smoothing=0.0, loss_type="sigmoid", loss_weights=None,
             chosen_lengths=None, rejected_lengths=None, discopop_tau=0.05):
    """Direct Preference Optimisation (Rafailov et al., 2023) on pairs (chosen y_w, rejected y_l).

    Where it comes from. The KL-regularised objective E_p[R] - β·KL(p ‖ p_ref) is maximised by

        p*(y|x) = p_ref(y|x) · exp(R(y|x)/β) / Z(x),

    so, solving for the reward, R(y|x) = β·log(p*(y|x)/p_ref(y|x)) + β·log Z(x). Bradley-Terry
    needs only the difference R(y_w|x) - R(y_l|x), in which β·log Z(x) cancels. Writing the policy
    being trained in place of p* gives the implicit reward β·log(p_θ/p_ref) and the likelihood of
    the preferences under it:

        L_DPO = -mean log σ(β·h),
        h = (log p_θ(y_w) - log p_ref(y_w)) - (log p_θ(y_l) - log p_ref(y_l))

    When the pairs cover every completion, its minimiser over all policies has β·log(p_θ/p_ref)
    = R + const(x), that is p_θ = p*: the RLHF optimum, reached without a reward model or sampling.

    ``label_smoothing`` ε (cDPO: labels flipped with probability ε, 0 <= ε <= 0.5):
        L = -mean[(1-ε)·log σ(β·h) + ε·log σ(-β·h)]
    ``loss_type="ipo"`` (Azar et al., 2023): L = mean (h - 1/(2β))², regressing h on a fixed target
    instead of pushing it to infinity. (TRL divides IPO's log-ratios by the completions' lengths:
    pass ``chosen_lengths`` and ``rejected_lengths`` for that; without them h is as passed.)
    TRL 1.16's other loss types (``hinge``, ``robust``, ``bco_pair``, ``exo_pair``, ``nca_pair``,
    ``sppo_hard``, ``aot``, ``aot_unpaired``, ``apo_zero``, ``apo_down``, ``discopop`` with τ =
    ``discopop_tau``, ``sigmoid_norm`` and ``sft``, these two needing the lengths), each beside its
    equation, are in `minirlhf.preference.DPO_LOSS_TYPES`. Several types at once (MPO): a list or
    "a,b", with ``loss_weights``, give L = Σ_k w_k·mean ℓ_k.

    The reference log-probs are constants (computed once, without gradient). Metrics, named and
    defined as TRL logs them: ``rewards/chosen`` = mean β(log p_θ(y_w) - log p_ref(y_w)),
    ``rewards/rejected`` likewise for y_l, ``rewards/margins`` = mean of their difference,
    ``rewards/accuracies`` = fraction of pairs whose chosen reward exceeds the rejected one,
    ``logps/chosen`` and ``logps/rejected`` = means of the policy log-probs.
    """
    from . import preference                                            # it builds on this module

    beta = check_beta(beta, "dpo_loss")
    eps = float(label_smoothing)
    if not 0.0 <= eps <= 0.5:
        raise ValueError(f"dpo_loss: label_smoothing must lie in [0, 0.5], got {eps}")
    types = preference.dpo_loss_types(loss_type, loss_weights, eps,
                                      {"chosen_lengths": chosen_lengths,
                                       "rejected_lengths": rejected_lengths})
    if not isinstance(policy_chosen_logps, Tensor) or not isinstance(policy_rejected_logps, Tensor):
        raise TypeError("dpo_loss: the policy log-probs must be Tensors")
    pc, pr = policy_chosen_logps, policy_rejected_logps
    xp = backend.get_array_module(pc.data)
    rc = array_of(ref_chosen_logps, xp).astype(pc.dtype)                 # constants: no gradient
    rr = array_of(ref_rejected_logps, xp).astype(pc.dtype)
    _check_same_shape("dpo_loss", policy_chosen_logps=pc.data, policy_rejected_logps=pr.data,
                      ref_chosen_logps=rc, ref_rejected_logps=rr)

    chosen = pc - ops.as_tensor(rc, like=pc)                             # log p_θ(y_w) / p_ref(y_w)
    rejected = pr - ops.as_tensor(rr, like=pc)                           # log p_θ(y_l) / p_ref(y_l)
    h = chosen - rejected                                                # (B,)
    pairs = preference.dpo_pairs(beta, eps, chosen, rejected, h, pc, pr, rc, rr, chosen_lengths,
                                 rejected_lengths, discopop_tau)
    loss = preference.dpo_combined_loss(types, pairs)

    r_w, r_l = beta * chosen.data, beta * rejected.data
    metrics = {
        "rewards/chosen": _float(r_w.mean()),
        "rewards/rejected": _float(r_l.mean()),
        "rewards/margins": _float((r_w - r_l).mean()),
        "rewards/accuracies": _float((r_w > r_l).mean()),
        "logps/chosen": _float(pc.data.mean()),
        "logps/rejected": _float(pr.data.mean()),
    }
    return loss, metrics


# ===================================================================================================
# policy optimisation: PPO's blocks
#
# Per-token quantities are (B, T) over the completion tokens, with ``keep`` (B, T) the boolean mask
# of the completion tokens (prompt and padding False), made once by the caller; per-sequence ones
# are (B,). The losses take the Tensor being trained and constant arrays, wrapped once where they
# meet it; the rollout's math (`kl_penalty_rewards`, `gae`, `masked_whiten`, `group_advantages`)
# takes arrays. Each formula is written once: the masked sums go through `_zero_outside`.


def _token_mean(x, keep):
    """Σ keep·x / max(Σ keep, 1) as a Python float: the metrics' mean over the tokens, which is 0,
    not an error, on an empty mask (TRL clamps the count at 1; `masked_mean` refuses)."""
    return _float(_zero_outside(x, keep).sum()) / max(int(keep.sum()), 1)


def masked_mean(x, keep, axis=None):
    """Mean of ``x`` over the entries where ``keep`` is true:  Σ m·x / Σ m  (over ``axis``, or all).

    Entries outside the mask never reach the sum, not even as 0·inf. A Tensor in gives a Tensor out,
    and the result keeps x's dtype (the count is cast to it: float32 / int64 would be float64).
    """
    _check_keep("masked_mean", keep, x.shape)
    count = keep.sum(axis=axis)
    if bool((count == 0).any()):
        raise ValueError("masked_mean: the mask selects no entry (all 0) along the reduced axis")
    return _zero_outside(x, keep).sum(axis=axis) / count.astype(x.dtype)


def masked_var(x, keep, unbiased=True):
    """Variance of ``x`` over the masked entries, μ = `masked_mean`:

        σ² = Σ m·(x - μ)² / (Σ m - 1)    (``unbiased``, Bessel's correction)   or   / Σ m
    """
    n = int(keep.sum())
    if unbiased and n < 2:
        raise ValueError(f"masked_var: the unbiased variance needs at least 2 masked entries, got {n}")
    centered = x - masked_mean(x, keep)
    var = masked_mean(centered * centered, keep)
    return var * (n / (n - 1)) if unbiased else var


def masked_whiten(x, keep, shift_mean=True):
    """(x - μ) / sqrt(σ² + 1e-8) with μ, σ² the masked mean and unbiased variance; 0 outside the mask.

    PPO whitens its advantages over the whole batch so that one step's size does not depend on the
    scale of the reward. σ² is the unbiased variance, as TRL's PPO computed it. ``shift_mean=False``
    adds μ back (rescales only), as TRL's does.
    """
    mu = masked_mean(x, keep)
    white = (x - mu) * (masked_var(x, keep) + 1e-8) ** -0.5
    if not shift_mean:
        white = white + mu
    return _zero_outside(white, keep)


def clipped_surrogate(logp, old_logp, advantages, keep, epsilon_low=0.2, epsilon_high=None):
    """PPO's clipped surrogate (Schulman et al., 2017), per token:

        L_t = -min(ρ_t·A_t, clip(ρ_t, 1 - ε_low, 1 + ε_high)·A_t),    ρ_t = exp(log p_θ - log p_old)

    ``logp`` (B, T) is the Tensor being trained; ``old_logp`` (B, T) the log-probs of the policy that
    sampled the batch and ``advantages`` (B,) or (B, T) are constants. Why the min: once ρ has
    moved past 1 ± ε in the direction the advantage rewards, the clipped term wins the min and
    its gradient is 0, so one batch cannot push the policy far from the one that sampled it; in
    the other direction the unclipped term stays, so a step that made things worse is undone.
    ``epsilon_high`` defaults to ``epsilon_low`` (DAPO's clip-higher sets it larger).

    Returns ``(per_token_loss, metrics)``: the (B, T) loss, 0 outside the mask (aggregate it with
    `masked_mean`), and, as masked means over the tokens, ``clipfrac`` = fraction of tokens whose
    clipped term is active, split into ``clipfrac/low`` (ρ < 1-ε_low, A < 0) and ``clipfrac/high``
    (ρ > 1+ε_high, A > 0), ``approxkl`` = ½(log ρ)², the k2 estimate of KL(p_old ‖ p_θ), and
    ``ratio``, the mean ρ (1 while the policy is still the one that sampled).
    """
    if not isinstance(logp, Tensor):
        raise TypeError("clipped_surrogate: logp must be a Tensor (the policy's log p_θ per token)")
    eps_lo = float(epsilon_low)
    eps_hi = eps_lo if epsilon_high is None else float(epsilon_high)
    if not (0 < eps_lo < 1 and eps_hi > 0):
        raise ValueError(f"clipped_surrogate: need 0 < epsilon_low < 1 and epsilon_high > 0, "
                         f"got {eps_lo} and {eps_hi}")
    xp = backend.get_array_module(logp.data)
    old = array_of(old_logp, xp).astype(logp.dtype)                       # (B, T) constants
    A = array_of(advantages, xp).astype(logp.dtype)
    if A.ndim == 1:
        A = A[:, None]                                                   # (B, 1): one per sequence
    _check_same_shape("clipped_surrogate", logp=logp.data, old_logp=old)
    if A.shape[0] != logp.shape[0] or A.shape[1] not in (1, logp.shape[1]):
        raise ValueError(f"clipped_surrogate: advantages must be (B,) or (B, T) for logp "
                         f"{tuple(logp.shape)}, got {tuple(array_of(advantages, xp).shape)}")
    _check_keep("clipped_surrogate", keep, logp.shape)

    log_ratio = logp - ops.as_tensor(old, like=logp)                     # (B, T) log ρ
    ratio = log_ratio.exp()                                              # (B, T) ρ
    A_t = ops.as_tensor(A, like=logp)
    unclipped = -(ratio * A_t)                                           # (B, T) -ρ·A
    clipped = -(ratio.clip(1.0 - eps_lo, 1.0 + eps_hi) * A_t)            # (B, T) -clip(ρ)·A
    per_token = ops.where(unclipped.data >= clipped.data, unclipped, clipped)   # -min(ρA, clip(ρ)A)
    per_token = _zero_outside(per_token, keep)

    r = ratio.data
    low = (r < 1.0 - eps_lo) & (A < 0)
    high = (r > 1.0 + eps_hi) & (A > 0)
    metrics = {"clipfrac": _token_mean(low | high, keep), "clipfrac/low": _token_mean(low, keep),
               "clipfrac/high": _token_mean(high, keep),
               "approxkl": _token_mean(kl_k2(logp.data, old), keep),   # ½(log ρ)²
               "ratio": _token_mean(r, keep)}
    return per_token, metrics


def kl_penalty_rewards(scores, logp, ref_logp, keep, beta, estimator="k1"):
    """The per-token reward PPO maximises (Ziegler et al., 2019; InstructGPT), (B, T):

        r_t = -β·k(log p_θ(y_t), log p_ref(y_t))  at every completion token t,
        r_T += R(y|x)                             at the last completion token T,

    with k Schulman's k1 (log p_θ - log p_ref, the default), k2 or k3 per token. With k1, the sum
    over the completion is exactly R̂ = R - β·(log p_θ(y) - log p_ref(y)) of `reinforce_kl_loss`;
    spread over tokens it lets GAE credit each token with the KL it itself added. 0 outside the
    mask. ``scores`` (B,) are R(y|x). Arrays in, an array out: the rewards are constants of the loss.
    """
    beta = check_beta(beta, "kl_penalty_rewards", allow_zero=True)
    k = _estimator("kl_penalty_rewards", estimator)(logp, ref_logp)    # (B, T)
    _check_keep("kl_penalty_rewards", keep, k.shape)
    xp = backend.get_array_module(keep)
    R = xp.asarray(scores).astype(k.dtype)
    if tuple(R.shape) != (keep.shape[0],):
        raise ValueError(f"kl_penalty_rewards: scores must be (B,) = ({keep.shape[0]},), "
                         f"got {tuple(R.shape)}")
    T = keep.shape[1]
    last = T - 1 - xp.argmax(keep[:, ::-1], axis=1)                      # (B,) last completion token
    at_last = (xp.arange(T)[None, :] == last[:, None]) & keep            # (B, T) one-hot
    score = xp.where(at_last, R[:, None], 0)                             # (B, T)
    return xp.where(keep, -beta * k, 0) + score


def gae(rewards, values, keep, gamma=1.0, lam=0.95):
    """Generalised advantage estimation (Schulman et al., 2016) over the completion tokens, (B, T):

        δ_t = r_t + γ·V_{t+1} - V_t,      A_t = δ_t + γλ·A_{t+1},      returns_t = A_t + V_t,

    run backwards from the last completion token, where V_{T+1} = A_{T+1} = 0 (the episode ends).
    Positions outside the mask are skipped (t+1 is the next *masked* token) and get 0. λ = 1 gives
    the reward-to-go minus V (unbiased, high variance); λ = 0 the one-step TD error (low variance,
    biased by V). Arrays in, arrays out: advantages are constants of the loss, never differentiated.
    Returns ``(advantages, returns)``.
    """
    gamma, lam = float(gamma), float(lam)
    if not (0 <= gamma <= 1 and 0 <= lam <= 1):
        raise ValueError(f"gae: need 0 <= gamma <= 1 and 0 <= lam <= 1, got {gamma} and {lam}")
    xp = backend.get_array_module(rewards, values)
    r, v = xp.asarray(rewards), xp.asarray(values)
    _check_same_shape("gae", rewards=r, values=v)
    _check_keep("gae", keep, r.shape)
    r = xp.where(keep, r, 0)
    v = xp.where(keep, v, 0)
    advantages = xp.zeros_like(r)
    next_value = xp.zeros_like(r[:, 0])                                  # (B,) V_{t+1}
    next_adv = xp.zeros_like(r[:, 0])                                    # (B,) A_{t+1}
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = xp.where(keep[:, t], adv, 0)
        next_value = xp.where(keep[:, t], v[:, t], next_value)
        next_adv = xp.where(keep[:, t], adv, next_adv)
    return advantages, xp.where(keep, advantages + v, 0)


def value_loss(values, old_values, returns, keep, clip_range_value=0.2):
    """PPO's clipped value loss, as in OpenAI's baselines and TRL:

        L_V = ½·masked_mean(max((V - returns)², (clip(V, V_old - c, V_old + c) - returns)²))

    ``values`` (B, T) is the Tensor being trained, ``old_values`` its values at rollout time and
    ``returns`` = A + V_old (from `gae`) constants. The clip keeps the value head, like the policy,
    near where it was when the batch was sampled; the max makes the clip a pessimistic bound, never
    a bonus. Returns ``(loss, metrics)``: ``clipfrac`` = fraction of tokens where the clipped term
    is the larger.
    """
    if not isinstance(values, Tensor):
        raise TypeError("value_loss: values must be a Tensor (the value head's output)")
    c = float(clip_range_value)
    if not c > 0:
        raise ValueError(f"value_loss: clip_range_value must be > 0, got {c}")
    xp = backend.get_array_module(values.data)
    old = array_of(old_values, xp).astype(values.dtype)                     # (B, T) constants
    returns = array_of(returns, xp).astype(values.dtype)
    _check_same_shape("value_loss", values=values.data, old_values=old, returns=returns)

    returns_t = ops.as_tensor(returns, like=values)
    err = values - returns_t
    err_clipped = values.clip(old - c, old + c) - returns_t
    loss1, loss2 = err * err, err_clipped * err_clipped                  # (B, T)
    worse = loss2.data > loss1.data
    loss = 0.5 * masked_mean(ops.where(worse, loss2, loss1), keep)
    return loss, {"clipfrac": _float(masked_mean(worse.astype(values.dtype), keep))}


# ===================================================================================================
# policy optimisation: GRPO's blocks
#
# GRPO (Shao et al., 2024, DeepSeekMath) drops PPO's value model: it samples a group of G completions
# per prompt and uses each one's reward, standardised within the group, as the advantage of every
# one of its tokens. The formulas below are TRL's GRPOTrainer's, term for term.


SCALES = ("group", "batch", "none")        # the scales `group_advantages` takes


def check_scale(scale, group_size, n_rewards):
    """The std `group_advantages` divides by must exist: ValueError unless ``scale`` is one of
    `SCALES`, a group holds 2 or more rewards for ``"group"``, the batch 2 or more for ``"batch"``
    (the one check of these, for the function and for GRPO's config alike)."""
    if scale not in SCALES:
        raise ValueError(f"scale_rewards must be one of {', '.join(SCALES)}, got {scale!r}")
    if scale == "group" and group_size < 2:
        raise ValueError(f"scale_rewards 'group' needs 2 or more samples per prompt (num_generations, "
                         f"group_size), got {group_size}: the std of one reward is undefined; use "
                         f"'none' or 'batch'")
    if scale == "batch" and n_rewards < 2:
        raise ValueError(f"scale_rewards 'batch' needs at least 2 rewards a batch, got {n_rewards}")


def group_advantages(rewards, group_size, scale="group", eps=1e-4):
    """GRPO's advantages (B,) from the rewards (B,) of groups of ``group_size`` consecutive rows:

        A_i = (r_i - mean_group(r)) / (std + eps)

    ``scale`` picks the std: ``"group"`` the std of i's group (GRPO), ``"batch"`` the std of all B
    rewards, ``"none"`` no division at all (Dr. GRPO: dividing by the std weighs prompts whose
    samples agree, too easy or too hard, more than the rest, and rescales the reward each step).
    The std is the unbiased one (ddof = 1), as ``torch.std`` computes it in TRL. The mean includes
    r_i itself, which shrinks the expected gradient by (G-1)/G (see `reinforce_kl_loss`'s
    ``"mean"``).
    Arrays in, an array out: advantages are constants of the loss.
    """
    xp = backend.get_array_module(rewards)
    r = xp.asarray(rewards)                                              # lists too
    G = int(group_size)
    if r.ndim != 1:
        raise ValueError(f"group_advantages: rewards must be (B,), got {tuple(r.shape)}")
    if G < 1 or r.shape[0] % G != 0:
        raise ValueError(f"group_advantages: group_size {group_size} does not divide the batch of "
                         f"{r.shape[0]} rewards")
    check_scale(scale, G, r.shape[0])
    groups = r.reshape(-1, G)                                            # (B/G, G)
    A = (groups - groups.mean(axis=1, keepdims=True)).reshape(-1)        # (B,) r - mean_group
    if scale == "group":
        std = xp.repeat(groups.std(axis=1, ddof=1), G)                   # (B,)
    elif scale == "batch":
        std = r.std(ddof=1)
    else:
        return A
    return A / (std + eps)


LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo", "sequence")


def aggregate_tokens(per_token_loss, keep, loss_type, max_completion_length=None):
    """One scalar from a per-token loss (B, T) and ``keep`` (B, T), the boolean mask of the tokens
    in it, as each variant weighs tokens.

    With |y_i| the number of tokens of sequence i (its mask's sum), m the mask, ℓ the loss:

    ``"grpo"``:  (1/B) Σ_i (1/|y_i|) Σ_t m·ℓ. Each sequence weighs the same, so each of its tokens
        weighs 1/|y_i|: a short sequence's tokens get larger steps, and a long wrong answer's tokens
        are penalised less than a short one's. The length bias Dr. GRPO pointed out: it favours
        short correct answers and long wrong ones.
    ``"bnpo"``:  Σ_{i,t} m·ℓ / Σ_{i,t} m, the mean over all the batch's tokens. Every token weighs
        the same (no length bias between sequences of one batch), but the normaliser is the batch's
        length, so how much one sequence counts depends on how long the others are.
    ``"dapo"``:  the same formula (DAPO's token-level loss). In TRL the normaliser is the number of
        tokens of the *whole* generation batch (``num_items_in_batch``, across gradient-accumulation
        steps and processes), so accumulated micro-batches sum to one token mean over all of them;
        ``bnpo`` instead divides each micro-batch by its own tokens and averages those means, which
        weighs the tokens of short micro-batches more. With one micro-batch the two are identical.
    ``"dr_grpo"``:  Σ_{i,t} m·ℓ / (B · max_completion_length). A constant normaliser: the gradient
        is the sequence-level sum (REINFORCE's) divided by a constant, with no length bias at all.
    ``"sequence"``:  (1/B) Σ_i Σ_t m·ℓ, the lecture's REINFORCE on whole sequences: no length bias,
        but longer sequences give larger (and noisier) steps, as their log-prob has more terms.

    A sequence whose mask is all 0 (a truncated completion, masked) contributes 0; its count is
    clamped at 1 as in TRL.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"aggregate_tokens: loss_type must be one of {', '.join(LOSS_TYPES)}, "
                         f"got {loss_type!r}")
    if loss_type == "dr_grpo" and (max_completion_length is None or max_completion_length < 1):
        raise ValueError("aggregate_tokens: loss_type='dr_grpo' needs max_completion_length >= 1 "
                         "(its constant normaliser)")
    _check_keep("aggregate_tokens", keep, per_token_loss.shape)
    xp = backend.get_array_module(keep)
    B = keep.shape[0]
    masked = _zero_outside(per_token_loss, keep)                         # (B, T)
    if loss_type == "grpo":
        lengths = xp.maximum(keep.sum(axis=1), 1).astype(masked.dtype)   # (B,) |y_i|, clamped
        return (masked.sum(axis=1) / lengths).sum() / B
    if loss_type in ("bnpo", "dapo"):
        return masked.sum() / max(int(keep.sum()), 1)
    if loss_type == "dr_grpo":
        return masked.sum() / (B * int(max_completion_length))
    return masked.sum() / B


def grpo_loss(logp, old_logp, ref_logp, advantages, keep, beta=0.0, epsilon_low=0.2,
              epsilon_high=None, loss_type="grpo", max_completion_length=None,
              use_bias_correction_kl=False):
    """GRPO's loss, as TRL's GRPOTrainer computes it, per token then aggregated:

        ℓ_t = -min(ρ_t·A, clip(ρ_t, 1-ε_low, 1+ε_high)·A) + β·k3_t,     ρ_t = exp(log p_θ - log p_old)
        k3_t = exp(log p_ref - log p_θ) - (log p_ref - log p_θ) - 1
        L = aggregate_tokens(ℓ, mask, loss_type)

    ``logp`` (B, T) is the Tensor being trained; ``old_logp`` (the sampler's log-probs; pass
    ``logp``'s values on-policy, where ρ = 1 but ∇ρ = ∇log p_θ), ``ref_logp`` (B, T) and
    ``advantages`` (B,) (from `group_advantages`) are constants. The KL is in the *loss*, not in the
    reward: its gradient flows through k3 itself, whose expected gradient is that of the forward
    KL(p_ref ‖ p_θ) token by token, not the lecture's KL(p_θ ‖ p_ref) (see `minirlhf.audit`).
    ``use_bias_correction_kl=True`` multiplies k3_t by ρ_t (TRL's default since 1.x, after
    DeepSeek-V3.2); ρ carries a gradient, which turns the expected gradient into the reverse KL's.
    β = 0 (TRL's default) drops the reference entirely.

    Returns ``(loss, metrics)`` with TRL's names, masked means over the tokens: ``kl`` (mean k3, only
    when β > 0), ``clip_ratio/low_mean`` (ρ < 1-ε_low and A < 0), ``clip_ratio/high_mean``
    (ρ > 1+ε_high and A > 0), ``clip_ratio/region_mean`` (either).
    """
    beta = check_beta(beta, "grpo_loss", allow_zero=True)
    if not isinstance(logp, Tensor):
        raise TypeError("grpo_loss: logp must be a Tensor (the policy's log p_θ per token)")
    xp = backend.get_array_module(logp.data)
    A = array_of(advantages, xp)
    if A.ndim != 1:
        raise ValueError(f"grpo_loss: advantages must be one per sequence (B,), got {tuple(A.shape)}")

    per_token, surrogate = clipped_surrogate(logp, old_logp, A, keep, epsilon_low, epsilon_high)
    metrics = {"clip_ratio/low_mean": surrogate["clipfrac/low"],
               "clip_ratio/high_mean": surrogate["clipfrac/high"],
               "clip_ratio/region_mean": surrogate["clipfrac"]}
    if beta > 0:
        ref = array_of(ref_logp, xp).astype(logp.dtype)
        k3 = kl_k3(logp, ref)                                            # (B, T), shapes checked
        if use_bias_correction_kl:
            old = array_of(old_logp, xp).astype(logp.dtype)
            k3 = k3 * (logp - ops.as_tensor(old, like=logp)).exp()       # k3·ρ, ρ differentiable
        k3 = _zero_outside(k3, keep)
        per_token = per_token + beta * k3
        metrics = {"kl": _token_mean(k3.data, keep), **metrics}
    loss = aggregate_tokens(per_token, keep, loss_type, max_completion_length)
    return loss, metrics


# ===================================================================================================
# the preference family beside DPO lives in minirlhf/preference.py (which builds on this module);
# ``from minirlhf.losses import kto_loss`` finds it there on first use

_PREFERENCE = ("kto_loss", "apo_zero_unpaired", "kto_mismatched_pairs", "cpo_loss", "simpo_loss",
               "orpo_loss")


def __getattr__(name):
    if name in _PREFERENCE:
        from . import preference
        return getattr(preference, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
