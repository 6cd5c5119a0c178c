"""The preference-optimisation family beside DPO: KTO, CPO/SimPO, ORPO and DPO's loss types.

Each loss is written beside its equation, term for term as TRL 1.16 computes it, so a user can check
their own TRL run against this code; where TRL departs from the paper (a clamp, a detached term, a
mean over a concatenation), the docstring says so in one line. Inputs are per-sequence log-probs (B,)
as `minirlhf.losses.dpo_loss` takes them: the policy's are Tensors, the reference's constants.
Each returns ``(loss, metrics)``, metrics under the names TRL logs.

    kto_mismatched_pairs  TRL's mismatched (prompt, completion) pairs for KTO's KL reference point
    kto_loss              KTO (Ethayarajh et al., 2024): unpaired thumbs-up / thumbs-down data
    apo_zero_unpaired     APO-zero on unpaired data: KTO with its reference point pinned at 0
    cpo_loss              CPO (Xu et al., 2024): DPO without a reference, plus α·NLL of the chosen
    simpo_loss            SimPO (Meng et al., 2024): length-normalised, no reference, a margin γ
    orpo_loss             ORPO (Hong et al., 2024): NLL of the chosen minus β·log σ(log odds ratio)
    DPO_LOSS_TYPES        the per-pair losses `dpo_loss(..., loss_type=...)` picks from (MPO: several)

Names as in the lecture: β (``beta``), p_θ the policy, p_ref the reference, y_w (``chosen``) and
y_l (``rejected``); ``r = log p_θ(y|x) - log p_ref(y|x)`` a completion's log-ratio, β·r its
implicit reward.
"""

from dataclasses import dataclass

import numpy as np

from . import backend
from . import functional as F
from . import ops
from .losses import _check_same_shape, _float, check_beta
from .tensor import Tensor, array_of

# ===================================================================================================
# helpers


def _policy(fn, *logps):
    """The policy log-probs as Tensors, refused (TypeError) otherwise: they carry the gradient."""
    if not all(isinstance(t, Tensor) for t in logps):
        raise TypeError(f"{fn}: the policy log-probs must be Tensors")
    return logps


def _const(x, like):
    """A constant (reference log-probs, lengths) as an array of ``like``'s dtype and device."""
    return array_of(x, backend.get_array_module(like.data)).astype(like.dtype)


def _lengths(fn, name, lengths, like):
    n = _const(lengths, like)
    if not bool((n > 0).all()):
        raise ValueError(f"{fn}: {name} must be >= 1 tokens per completion, got {n.min()}")
    return n


def _check_smoothing(fn, eps):
    eps = float(eps)
    if not 0.0 <= eps <= 0.5:
        raise ValueError(f"{fn}: label_smoothing must lie in [0, 0.5], got {eps}")
    return eps


def _pair_metrics(r_w, r_l, logps_w, logps_l):
    """TRL's pair metrics from the rewards (arrays) and the log-probs logged beside them."""
    return {"rewards/chosen": _float(r_w.mean()), "rewards/rejected": _float(r_l.mean()),
            "rewards/accuracies": _float((r_w > r_l).mean()),
            "rewards/margins": _float((r_w - r_l).mean()),
            "logps/chosen": _float(logps_w.mean()), "logps/rejected": _float(logps_l.mean())}


# ===================================================================================================
# KTO: unpaired data


def kto_mismatched_pairs(n, batch_size=None):
    """Which completion each of ``n`` examples is paired with for KTO's KL estimate: (n,) indices.

    TRL rotates the completions by one within each batch of ``batch_size`` consecutive examples
    (all ``n`` if None): (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1}), so the mismatched completions
    are the batch's own, each under another prompt. A last batch of one example is paired with its
    own completion, as in TRL (whose trainers refuse a batch size below 2).
    """
    n = int(n)
    size = n if batch_size is None else int(batch_size)
    if n < 1 or size < 1:
        raise ValueError(f"kto_mismatched_pairs: need n >= 1 and batch_size >= 1, got {n}, {size}")
    index = []
    for start in range(0, n, size):
        block = list(range(start, min(start + size, n)))
        index += block[-1:] + block[:-1]                                 # rotate by +1
    return np.asarray(index, dtype=np.int64)                            # host indices


def kto_loss(policy_logps, ref_logps, desirable, kl, beta=0.1, desirable_weight=1.0,
             undesirable_weight=1.0, loss_type="kto"):
    """KTO (Ethayarajh et al., 2024, eq. 7) on unpaired examples, as TRL's KTOTrainer computes it.

    Each example is a completion y of a prompt x labelled desirable (thumbs up) or not, with the
    log-ratio r = log p_θ(y|x) - log p_ref(y|x). Its value is measured against a reference point

        z0 = max(0, mean_{(x, y')} [log p_θ(y'|x) - log p_ref(y'|x)])      held constant (no gradient)

    an estimate of KL(p_θ ‖ p_ref) from *mismatched* pairs (`kto_mismatched_pairs`); ``kl`` holds
    their log-ratios (any shape; z0 is their mean, clamped at 0). The loss is

        desirable:    λ_D · (1 - σ(β·(r - z0)))
        undesirable:  λ_U · (1 - σ(β·(z0 - r)))
        L = mean over the batch of both kinds together

    The mean runs over the examples of both kinds together, not per kind (a batch of 3 good and 1
    bad example weighs the bad one 1/4, not 1/2; λ_D, λ_U rebalance), and z0 is this batch's
    estimate (TRL averages it over processes). A batch with only one kind works.
    ``loss_type="apo_zero_unpaired"`` pins z0 at 0 (see `apo_zero_unpaired`); ``kl`` is then
    ignored (TRL logs ``kl`` = 0).

    Metrics as TRL 1.16 logs them: ``kl`` (z0), ``rewards/chosen`` and ``logps/chosen`` (means of β·r
    and of log p_θ over the desirable examples), ``rewards/rejected`` and ``logps/rejected`` (over the
    undesirable ones), each only when the batch has that kind, and ``rewards/margins`` (their
    difference) only when it has both.
    """
    beta = check_beta(beta, "kto_loss")
    if loss_type not in ("kto", "apo_zero_unpaired"):
        raise ValueError(f"kto_loss: loss_type must be 'kto' or 'apo_zero_unpaired', got {loss_type!r}")
    (logp,) = _policy("kto_loss", policy_logps)
    xp = backend.get_array_module(logp.data)
    ref = _const(ref_logps, logp)
    good = array_of(desirable, xp)
    if good.dtype != bool and not bool(((good == 0) | (good == 1)).all()):
        raise ValueError("kto_loss: desirable must be booleans (or 0/1), one per example")
    good = good.astype(bool)
    _check_same_shape("kto_loss", policy_logps=logp.data, ref_logps=ref, desirable=good)
    if logp.ndim != 1:
        raise ValueError(f"kto_loss: expected one log-prob per example (B,), got {tuple(logp.shape)}")

    if loss_type == "kto":
        if kl is None:
            raise ValueError("kto_loss: loss_type='kto' needs kl, the log-ratios of mismatched pairs")
        z0 = max(_float(array_of(kl, xp).mean()), 0.0)                   # a constant: no gradient
    else:
        z0 = 0.0
    r = logp - ops.as_tensor(ref, like=logp)                             # (B,) log p_θ/p_ref
    sign = xp.where(good, 1.0, -1.0).astype(logp.dtype)                  # +1 desirable, -1 not
    weight = xp.where(good, float(desirable_weight), float(undesirable_weight)).astype(logp.dtype)
    # desirable 1 - σ(β(r - z0)); undesirable 1 - σ(β(z0 - r)): one expression, signed
    per_example = weight * (1 - (beta * (r - z0) * sign).sigmoid())      # (B,)
    loss = per_example.mean()

    metrics = {"kl": z0}
    rewards, logps = beta * r.data, logp.data
    if bool(good.any()):
        metrics["rewards/chosen"] = _float(rewards[good].mean())
        metrics["logps/chosen"] = _float(logps[good].mean())
    if bool((~good).any()):
        metrics["rewards/rejected"] = _float(rewards[~good].mean())
        metrics["logps/rejected"] = _float(logps[~good].mean())
    if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return loss, metrics


def apo_zero_unpaired(policy_logps, ref_logps, desirable, beta=0.1, desirable_weight=1.0,
                      undesirable_weight=1.0):
    """APO-zero on unpaired data (D'Oosterlinck et al., 2024, eq. 7, unpaired; TRL's KTOTrainer):

        desirable:  λ_D · (1 - σ(β·r))          undesirable:  λ_U · σ(β·r)

    that is, `kto_loss` with its reference point z0 pinned at 0 (1 - σ(-β·r) = σ(β·r)): it pushes
    every good completion's likelihood up and every bad one's down, without a KL estimate, for
    data whose good answers beat what the model writes now.
    """
    return kto_loss(policy_logps, ref_logps, desirable, None, beta=beta,
                    desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
                    loss_type="apo_zero_unpaired")


# ===================================================================================================
# CPO and SimPO: no reference model

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")


def cpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths,
             beta=0.1, label_smoothing=0.0, cpo_alpha=1.0, loss_type="sigmoid", simpo_gamma=0.5):
    """CPO (Xu et al., 2024) as TRL's CPOTrainer computes it: DPO with p_ref dropped, plus SFT.

    With s_w, s_l the policy's *summed* log-probs of y_w, y_l and n_w, n_l their lengths, TRL
    uses the averages a = s/n for ``ipo`` and ``simpo`` and the sums for the others:

        u = s_w - s_l   (a_w - a_l for ipo, simpo),   ε = label_smoothing
        sigmoid:  -(1-ε)·log σ(β·u) - ε·log σ(-β·u)          (CPO's eq. 3 at ε = 0)
        hinge:    max(0, 1 - β·u)
        ipo:      (u - 1/(2β))²
        simpo:    the sigmoid loss at u - γ/β, so the margin γ sits in the logit: β·u - γ
        L = mean_pairs + cpo_alpha · NLL(y_w),     NLL(y_w) = -Σ_b s_w / Σ_b n_w

    The NLL is the mean over all the chosen tokens of the batch (TRL's cross-entropy on the chosen
    half), 0 when ``cpo_alpha`` = 0. TRL ignores label_smoothing for hinge and ipo; so does this.

    Metrics, as TRL: ``rewards/chosen`` = mean β·s_w (β·a_w for ipo, simpo), ``rewards/rejected``,
    ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected`` (the log-probs
    the loss used), ``nll_loss``.
    """
    beta = check_beta(beta, "cpo_loss")
    if loss_type not in CPO_LOSS_TYPES:
        raise ValueError(f"cpo_loss: unknown loss_type {loss_type!r}; known: {', '.join(CPO_LOSS_TYPES)}")
    eps = _check_smoothing("cpo_loss", label_smoothing)
    pc, pr = _policy("cpo_loss", policy_chosen_logps, policy_rejected_logps)
    n_w = _lengths("cpo_loss", "chosen_lengths", chosen_lengths, pc)
    n_l = _lengths("cpo_loss", "rejected_lengths", rejected_lengths, pc)
    _check_same_shape("cpo_loss", policy_chosen_logps=pc.data, policy_rejected_logps=pr.data,
                      chosen_lengths=n_w, rejected_lengths=n_l)

    if loss_type in ("ipo", "simpo"):
        pc_used, pr_used = pc / n_w, pr / n_l                            # (B,) average log-probs
    else:
        pc_used, pr_used = pc, pr
    u = pc_used - pr_used                                                # (B,)
    if loss_type == "simpo":
        u = u - float(simpo_gamma) / beta
    if loss_type in ("sigmoid", "simpo"):
        losses = -F.logsigmoid(beta * u) * (1 - eps) - F.logsigmoid(-beta * u) * eps
    elif loss_type == "hinge":
        losses = (1 - beta * u).relu()
    else:
        losses = (u - 1 / (2 * beta)) ** 2
    loss = losses.mean()
    nll = 0.0
    if float(cpo_alpha) != 0:
        nll = -pc.sum() / float(n_w.sum())                               # token mean over y_w
        loss = loss + float(cpo_alpha) * nll

    metrics = _pair_metrics(beta * pc_used.data, beta * pr_used.data, pc_used.data, pr_used.data)
    metrics["nll_loss"] = _float(nll.data) if isinstance(nll, Tensor) else 0.0
    return loss, metrics


def simpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths,
               beta=2.0, gamma=0.5, label_smoothing=0.0, cpo_alpha=0.0):
    """SimPO (Meng et al., 2024): a length-normalised implicit reward and a target margin, no p_ref.

        L = -mean log σ(β·(s_w/n_w - s_l/n_l) - γ)

    with s the summed log-probs and n the lengths: the reward β·(average log-prob) is what the
    policy generates by (no reference model to keep it near), and γ asks the chosen to win by a
    margin. This is TRL's `cpo_loss` with ``loss_type="simpo"``: TRL subtracts γ/β from the
    difference of averages inside the β-scaled logit, the same number. ``cpo_alpha`` > 0 adds the
    NLL of the chosen (CPO-SimPO). With no reference there is no finite optimum: the margin can grow
    without end (see the audit).
    """
    return cpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths,
                    beta=beta, label_smoothing=label_smoothing, cpo_alpha=cpo_alpha,
                    loss_type="simpo", simpo_gamma=gamma)


# ===================================================================================================
# ORPO: SFT and preference in one loss, no reference model


def orpo_loss(chosen_avg_logps, rejected_avg_logps, chosen_nll, beta=0.1):
    """ORPO (Hong et al., 2024, eqs. 4-7) as TRL's ORPOTrainer computes it.

    On the *average* per-token log-probs a_w, a_l (<= 0), the odds of a completion are
    odds(a) = e^a / (1 - e^a), and

        log odds ratio = (a_w - a_l) - (log(1 - e^a_w) - log(1 - e^a_l))
        L = NLL(y_w) - β · mean log σ(log odds ratio)

    ``chosen_nll`` is the SFT loss of the chosen completions (the mean over their tokens, a Tensor,
    e.g. `minirlhf.losses.sft_loss`). log(1 - e^a) is `functional.log1mexp`'s stable form, and
    log σ(log odds ratio) one fused node (`functional.logsigmoid_odds_ratio`): a chosen completion
    the policy is certain of (a_w = 0) gives the finite limit (the term 0, its gradient in a_w
    e^a_l/(1 - e^a_l)); a certain *rejected* one (a_l = 0) is an infinite loss, in TRL as here.

    Metrics, as TRL: ``rewards/chosen`` = mean β·a_w, ``rewards/rejected``, ``rewards/accuracies``,
    ``rewards/margins``, ``logps/chosen`` and ``logps/rejected`` (means of a_w, a_l), ``nll_loss``,
    ``log_odds_ratio`` = mean log σ(log odds ratio), ``log_odds_chosen`` = mean log odds ratio.
    """
    beta = check_beta(beta, "orpo_loss")
    a_w, a_l = _policy("orpo_loss", chosen_avg_logps, rejected_avg_logps)
    _check_same_shape("orpo_loss", chosen_avg_logps=a_w.data, rejected_avg_logps=a_l.data)
    if bool((a_w.data > 0).any()) or bool((a_l.data > 0).any()):
        raise ValueError("orpo_loss: average log-probs must be <= 0 (a log-prob is at most 0)")
    nll = chosen_nll if isinstance(chosen_nll, Tensor) else ops.as_tensor(_float(chosen_nll), like=a_w)

    node = F.LogSigmoidOddsRatio()
    ratio = node(a_w, a_l)                                               # (B,) log σ(log odds ratio)
    loss = nll - (beta * ratio).mean()

    metrics = _pair_metrics(beta * a_w.data, beta * a_l.data, a_w.data, a_l.data)
    metrics.update({"nll_loss": _float(nll.data), "log_odds_ratio": _float(ratio.data.mean()),
                    "log_odds_chosen": _float(node.log_odds.mean())})
    return loss, metrics


# ===================================================================================================
# DPO's loss types (TRL's DPOTrainer, loss_type=...; several at once with loss_weights: MPO)


@dataclass
class Pairs:
    """What a DPO loss type reads from a batch of pairs. ``chosen`` and ``rejected`` are the
    log-ratios r_w = log p_θ(y_w)/p_ref(y_w) and r_l (Tensors), ``h`` = r_w - r_l; ``policy_*`` the
    policy's summed log-probs (Tensors), ``ref_*`` the reference's (arrays); ``*_lengths`` the
    completions' token counts (arrays, or None); ``eps`` the label smoothing, ``tau`` DiscoPOP's τ."""
    beta: float
    eps: float
    chosen: Tensor
    rejected: Tensor
    h: Tensor
    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: object
    ref_rejected: object
    chosen_lengths: object = None
    rejected_lengths: object = None
    tau: float = 0.05


def _smoothed_sigmoid(beta, d, eps):
    """-(1-ε)·log σ(β·d) - ε·log σ(-β·d): the logistic loss, labels flipped with probability ε."""
    if eps == 0:
        return -F.logsigmoid(beta * d)
    return -((1 - eps) * F.logsigmoid(beta * d) + eps * F.logsigmoid(-beta * d))


def _sigmoid(p):
    """DPO: -log σ(β·h); with ε > 0, cDPO's -(1-ε)·log σ(β·h) - ε·log σ(-β·h).
    TRL 1.16's sigmoid ignores label_smoothing (it lives in robust, exo_pair, aot); this keeps cDPO."""
    return _smoothed_sigmoid(p.beta, p.h, p.eps)


def _hinge(p):
    """SLiC (Zhao et al., 2023): max(0, 1 - β·h)."""
    return (1 - p.beta * p.h).relu()


def _ipo(p):
    """IPO (Azar et al., 2023, eq. 17): (h - 1/(2β))². With lengths, TRL's form: h on the log-ratios
    divided by the lengths, h = r_w/n_w - r_l/n_l (not in the paper; its authors' choice)."""
    h = p.h
    if p.chosen_lengths is not None:
        h = p.chosen / p.chosen_lengths - p.rejected / p.rejected_lengths
    return (h - 1.0 / (2.0 * p.beta)) ** 2


def _exo_pair(p):
    """EXO (Ji et al., 2024, eq. 16): KL(q ‖ p_ε) over the pair, q = (σ(β·h), σ(-β·h)) the model's,
    p_ε = (1-ε, ε) the labels': q_w·(log q_w - log(1-ε)) + q_l·(log q_l - log ε); needs ε > 0."""
    z = p.beta * p.h
    q_w, q_l = z.sigmoid(), (-z).sigmoid()
    return (q_w * (F.logsigmoid(z) - float(np.log1p(-p.eps)))
            + q_l * (F.logsigmoid(-z) - float(np.log(p.eps))))


def _nca_pair(p):
    """NCA (Chen et al., 2024): -log σ(β·r_w) - ½·log σ(-β·r_w) - ½·log σ(-β·r_l)."""
    r_w, r_l = p.beta * p.chosen, p.beta * p.rejected
    return -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)


def _robust(p):
    """rDPO (Chowdhury et al., 2024): (-(1-ε)·log σ(β·h) + ε·log σ(-β·h)) / (1 - 2ε), an unbiased
    loss under labels flipped with probability ε < ½."""
    z = p.beta * p.h
    return (-(1 - p.eps) * F.logsigmoid(z) + p.eps * F.logsigmoid(-z)) / (1 - 2 * p.eps)


def _bco_pair(p):
    """BCO on pairs (Jung et al., 2024): -log σ(β·r_w) - log σ(-β·r_l), each side a binary classifier.
    TRL 1.16's DPOTrainer shifts no reward by a running mean δ (the paper's, and old TRL's); nor does
    this: no state is kept between calls."""
    return -F.logsigmoid(p.beta * p.chosen) - F.logsigmoid(-p.beta * p.rejected)


def _sppo_hard(p):
    """SPPO with hard labels (Wu et al., 2024, eq. 4.7 with P = 1 for y_w):
    (r_w - 1/(2β))² + (r_l + 1/(2β))²."""
    return (p.chosen - 0.5 / p.beta) ** 2 + (p.rejected + 0.5 / p.beta) ** 2


def _sort(t):
    """t sorted along the batch (a gather, so the gradient goes back to each element's place)."""
    return t[backend.get_array_module(t.data).argsort(t.data, kind="stable")]


def _aot(p):
    """AOT paired (Melnyk et al., 2024): the smoothed logistic loss on the sorted policy margins
    minus the sorted reference margins, δ = sort(s_w - s_l) - sort(s_w^ref - s_l^ref)."""
    xp = backend.get_array_module(p.h.data)
    ref_sorted = xp.sort(p.ref_chosen - p.ref_rejected)                 # a constant
    delta = _sort(p.policy_chosen - p.policy_rejected) - ops.as_tensor(ref_sorted, like=p.h)
    return _smoothed_sigmoid(p.beta, delta, p.eps)


def _aot_unpaired(p):
    """AOT unpaired: the smoothed logistic loss on δ = sort(r_w) - sort(r_l), the chosen log-ratios'
    distribution set against the rejected ones' (first-order stochastic dominance)."""
    return _smoothed_sigmoid(p.beta, _sort(p.chosen) - _sort(p.rejected), p.eps)


def _apo_zero(p):
    """APO-zero (D'Oosterlinck et al., 2024, eq. 7): (1 - σ(β·r_w)) + σ(β·r_l): chosen up,
    rejected down."""
    return (1 - (p.beta * p.chosen).sigmoid()) + (p.beta * p.rejected).sigmoid()


def _apo_down(p):
    """APO-down (eq. 8): σ(β·r_w) + (1 - σ(β·h)): both down, the rejected more."""
    return (p.beta * p.chosen).sigmoid() + (1 - (p.beta * p.h).sigmoid())


def _discopop(p):
    """DiscoPOP (Chris Lu et al., 2024, eq. 5), with z = β·h and m = σ(z/τ):
    (1 - m)·(-log σ(z)) + m·e^{-z}, a logistic loss blended with an exponential one."""
    z = p.beta * p.h
    m = (z / p.tau).sigmoid()
    return -F.logsigmoid(z) * (1 - m) + (-z).exp() * m


def _sft(p):
    """The NLL of the chosen, -Σ_b s_w / Σ_b n_w: TRL's mean over every chosen token of the batch,
    one number for the batch (needs chosen_lengths)."""
    return -p.policy_chosen.sum() / float(p.chosen_lengths.sum())


def _sigmoid_norm(p):
    """DPO on length-averaged log-ratios: -log σ(β·(r_w/n_w - r_l/n_l)) (needs both lengths)."""
    return -F.logsigmoid(p.beta * (p.chosen / p.chosen_lengths - p.rejected / p.rejected_lengths))


DPO_LOSS_TYPES = {"sigmoid": _sigmoid, "hinge": _hinge, "ipo": _ipo, "exo_pair": _exo_pair,
                  "nca_pair": _nca_pair, "robust": _robust, "bco_pair": _bco_pair,
                  "sppo_hard": _sppo_hard, "aot": _aot, "aot_unpaired": _aot_unpaired,
                  "apo_zero": _apo_zero, "apo_down": _apo_down, "discopop": _discopop,
                  "sft": _sft, "sigmoid_norm": _sigmoid_norm}
SMOOTHED_LOSS_TYPES = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired")
NEED_LENGTHS = {"sft": ("chosen_lengths",), "sigmoid_norm": ("chosen_lengths", "rejected_lengths")}


def dpo_loss_types(loss_type, loss_weights, label_smoothing, lengths):
    """The checked list of (name, weight) that `dpo_loss` sums, each refusal in one line.

    ``loss_type`` is a name, a comma-separated list of names or a sequence of them; ``loss_weights``
    one float per name (default 1 each); ``lengths`` maps 'chosen_lengths' / 'rejected_lengths' to
    what the caller gave (None if nothing).
    """
    names = loss_type.split(",") if isinstance(loss_type, str) else list(loss_type)
    names = [str(n).strip() for n in names]
    unknown = [n for n in names if n not in DPO_LOSS_TYPES]
    if not names or unknown:
        raise ValueError(f"dpo_loss: unknown loss_type {', '.join(unknown) or repr(loss_type)}; "
                         f"known: {', '.join(DPO_LOSS_TYPES)}")
    if loss_weights is None:
        weights = [None] * len(names)
    else:
        weights = [float(w) for w in loss_weights]
        if len(weights) != len(names):
            raise ValueError(f"dpo_loss: {len(weights)} loss_weights for {len(names)} loss types "
                             f"({', '.join(names)}): give one weight per type")
    eps = float(label_smoothing)
    if eps != 0 and not any(n in SMOOTHED_LOSS_TYPES for n in names):
        raise ValueError(f"dpo_loss: label_smoothing applies to loss_type in "
                         f"{', '.join(SMOOTHED_LOSS_TYPES)} only, not {', '.join(names)}")
    if "exo_pair" in names and eps == 0:
        raise ValueError("dpo_loss: loss_type='exo_pair' needs label_smoothing > 0 (EXO's paper: 1e-3)")
    if "robust" in names and eps >= 0.5:
        raise ValueError("dpo_loss: loss_type='robust' needs label_smoothing < 0.5 (it divides by 1 - 2ε)")
    for n in names:
        missing = [k for k in NEED_LENGTHS.get(n, ()) if lengths.get(k) is None]
        if missing:
            raise ValueError(f"dpo_loss: loss_type={n!r} needs {' and '.join(missing)} "
                             "(token counts of the completions)")
    return list(zip(names, weights))


def dpo_pairs(beta, eps, chosen, rejected, h, policy_chosen, policy_rejected, ref_chosen,
              ref_rejected, chosen_lengths, rejected_lengths, tau):
    """`Pairs` for `dpo_loss`, the lengths (if given) checked: >= 1 and one per pair."""
    lengths = {}
    for name, n in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        if n is not None:
            lengths[name] = _lengths("dpo_loss", name, n, policy_chosen)
            _check_same_shape("dpo_loss", policy_chosen_logps=policy_chosen.data, **{name: lengths[name]})
    return Pairs(beta, eps, chosen, rejected, h, policy_chosen, policy_rejected, ref_chosen,
                 ref_rejected, tau=float(tau), **lengths)


def dpo_combined_loss(types, pairs):
    """Σ_k w_k · mean_pairs ℓ_k as TRL sums MPO's terms; one type with no weight is its mean alone."""
    if len(types) == 1 and types[0][1] is None:
        return DPO_LOSS_TYPES[types[0][0]](pairs).mean()
    loss = None
    for name, weight in types:
        term = DPO_LOSS_TYPES[name](pairs).mean() * (1.0 if weight is None else weight)
        loss = term if loss is None else loss + term
    return loss
