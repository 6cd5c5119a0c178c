"""Fused, numerically stable ops with hand-derived backward passes.

Each could be composed from the primitives in `ops.py`, but composing them would overflow (``exp``
of a logit of 1e4), keep many temporaries alive for backward, and be slow. Here each is one node whose
backward is written from its derivative, stated in the docstring, and checked by `gradcheck`.
Each has a plain version in `reference.py`, the same equation written with the primitives (autograd
doing the backward): read that one first; tests/test_reference.py checks that the two agree.
Forward and backward here are the math on whole arrays; where the CPU wants rows in blocks on threads
or buffers reused in place, they call the kernel in `kernels.py` named by what it computes.

    import minirlhf.functional as F
"""

import math

from . import backend, kernels, rotary
from .ops import as_tensor, stable_sigmoid
from .tensor import Function, Tensor, array_of

# ===================================================================================================
# softmax family




class Softmax(Function):
    def __init__(self, axis):
        self.axis = axis

    def forward(self, x):
        xp = backend.get_array_module(x)
        e = xp.exp(x - x.max(axis=self.axis, keepdims=True))
        self.y = e / e.sum(axis=self.axis, keepdims=True)
        return self.y

    def backward(self, gy):
        """y = softmax(x)  ->  gx = y ⊙ (gy - Σ_j gy_j y_j)."""
        y = self.y
        return (y * (gy - (gy * y).sum(axis=self.axis, keepdims=True)),)


class LogSoftmax(Function):
    def __init__(self, axis):
        self.axis = axis

    def forward(self, x):
        self.y = kernels.log_softmax(x, self.axis)
        return self.y

    def backward(self, gy):
        """y = x - logsumexp(x)  ->  gx = gy - softmax(x) · Σ_j gy_j."""
        xp = backend.get_array_module(gy)
        return (gy - xp.exp(self.y) * gy.sum(axis=self.axis, keepdims=True),)


def softmax(x, axis=-1):
    """softmax(x)_i = exp(x_i) / Σ_j exp(x_j) along ``axis``. Plain version: `reference.softmax`."""
    return Softmax(axis)(x)


def log_softmax(x, axis=-1):
    """log softmax(x)_i = x_i - log Σ_j exp(x_j) along ``axis``. Plain version:
    `reference.log_softmax`."""
    return LogSoftmax(axis)(x)


class CrossEntropy(Function):
    def __init__(self, targets, ignore_index, reduction):
        self.targets, self.ignore_index, self.reduction = targets, ignore_index, reduction

    def forward(self, logits):
        xp = backend.get_array_module(logits)
        V = logits.shape[-1]
        t = self.targets.reshape(-1)                                  # (N,)
        self.valid = t != self.ignore_index
        self.safe_t = xp.where(self.valid, t, 0)                      # ignored rows pick class 0
        self.logp = kernels.log_softmax_rows(logits.reshape(-1, V))   # (N, V)
        self.shape = logits.shape
        nll = -self.logp[xp.arange(t.shape[0]), self.safe_t] * self.valid   # (N,)
        if self.reduction == "none":
            return nll.reshape(self.targets.shape)
        if self.reduction == "sum":
            return nll.sum()
        self.count = int(self.valid.sum())
        return nll.sum() / self.count  # nan when every target is ignored, as in PyTorch

    def backward(self, gy):
        """L_i = -log softmax(z_i)[t_i]  ->  ∂L_i/∂z_i = softmax(z_i) - onehot(t_i); 0 if ignored.

        With the mean over the N valid rows, each row's gradient is also divided by N.
        """
        xp = backend.get_array_module(gy)
        if self.reduction == "none":
            scale = gy.reshape(-1, 1) * self.valid[:, None]
        elif self.reduction == "sum":
            scale = gy * self.valid[:, None]
        else:
            # no valid row: the loss is nan (as in PyTorch) but the gradient is 0, not nan
            scale = (gy / max(self.count, 1)) * self.valid[:, None]
        scale = xp.broadcast_to(scale, (self.logp.shape[0], 1)).astype(self.logp.dtype)  # (N, 1)
        g = kernels.softmax_rows_times(self.logp, scale)              # softmax · scale, (N, V)
        g[xp.arange(g.shape[0]), self.safe_t] -= scale[:, 0]          # - onehot · scale
        return (g.reshape(self.shape),)


def cross_entropy(logits, targets, ignore_index=-100, reduction="mean"):
    """Cross-entropy of ``logits`` (..., V) against integer ``targets`` (...).

    Rows whose target equals ``ignore_index`` contribute nothing (not even to the mean's count).
    ``reduction``: "mean" over the kept rows, "sum", or "none" (one loss per row).
    Plain version: `reference.cross_entropy`.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    t = check_targets(logits, targets, "cross_entropy")
    check_ids(t, logits.shape[-1], "cross_entropy: target", ignore=ignore_index)
    return CrossEntropy(t, ignore_index, reduction)(logits)


def check_targets(logits, targets, fn):
    """``targets`` as an integer array on the logits' device, one per row of ``logits`` (..., V)."""
    t = array_of(targets, backend.get_array_module(logits.data))
    if t.dtype.kind not in "iu":
        raise TypeError(f"{fn}: targets must be integers, got dtype {t.dtype}")
    if tuple(t.shape) != logits.shape[:-1]:
        raise ValueError(f"{fn}: targets of shape {tuple(t.shape)} do not match logits of "
                         f"shape {logits.shape} (expected {logits.shape[:-1]})")
    return t


class IdRangeError(IndexError, ValueError):
    """An id outside [0, n): an IndexError like any bad index, and a ValueError like any bad input
    (NumPy's AxisError is both for the same reason)."""


def check_ids(ids, n, what, ignore=None):
    """Refuse ids outside [0, n) (except ``ignore``): CuPy would silently wrap them around."""
    if ids.size == 0:
        return
    bad = (ids < 0) | (ids >= n)
    if ignore is not None:
        bad &= ids != ignore
    if bool(bad.any()):
        value = int(ids[bad].reshape(-1)[0])
        raise IdRangeError(f"{what} {value} is out of range [0, {n})")




# ===================================================================================================
# log-probs of chosen tokens, entropy, and the k3 estimator of KL


class TokenLogprobs(Function):
    """``log softmax(z)[t]`` for each row of logits ``z`` (..., V) and integer target ``t`` (...):
    `logprobs.token_logprobs`. The same numbers as ``-cross_entropy(z, t, reduction="none")``,
    named for what the RL losses read: the log-probability of each chosen token."""

    def __init__(self, targets):
        self.targets = targets

    def forward(self, logits):
        xp = backend.get_array_module(logits)
        self.t, self.shape = self.targets.reshape(-1), logits.shape          # (N,)
        self.rows = xp.arange(self.t.shape[0])                               # (N,)
        self.logp = kernels.log_softmax_rows(logits.reshape(-1, logits.shape[-1]))   # (N, V)
        return self.logp[self.rows, self.t].reshape(self.targets.shape)      # (...)

    def backward(self, gy):
        """y = z_t - logsumexp(z)  ->  ∂y/∂z = onehot(t) - softmax(z),
        gx = gy · (onehot(t) - softmax(z)).

        No one-hot is built: gx starts as -gy · softmax(z) and gy is added at column t of each row.
        """
        g = gy.reshape(-1, 1)                                                # (N, 1)
        gx = kernels.softmax_rows_times(self.logp, -g)                       # (N, V)
        gx[self.rows, self.t] += g[:, 0]
        return (gx.reshape(self.shape),)


class Entropy(Function):
    """H = -Σ_j p_j log p_j with p = softmax(z), over the last axis of logits z (..., V):
    `logprobs.token_entropy`."""

    def forward(self, logits):
        xp = backend.get_array_module(logits)
        logp = kernels.log_softmax(logits, axis=-1)
        p = xp.exp(logp)
        logp = xp.where(p > 0, logp, 0)                                    # 0·log 0 = 0 (z = -inf)
        self.p, self.logp = p, logp
        self.H = -(p * logp).sum(axis=-1)                                  # (...)
        return self.H

    def backward(self, gy):
        """H = -Σ_i p_i log p_i,  ∂p_i/∂z_j = p_i (δ_ij - p_j)  ->  ∂H/∂z_j = -p_j (log p_j + H).

        (Differentiate: -Σ_i (log p_i + 1) p_i (δ_ij - p_j) = -p_j log p_j - p_j + p_j (1 - H).)
        """
        gz = -self.p * (self.logp + self.H[..., None])
        return (gy[..., None] * gz,)


class KLk3(Function):
    """k3 = (e^u - 1) - u of the log-ratio u = log r = log p_ref - log p_θ (`losses.kl_k3`)."""

    def forward(self, u):
        xp = backend.get_array_module(u)
        self.u = u
        # expm1 keeps the digits that exp(u) - 1 would cancel; rounding must not make it negative
        return xp.maximum(xp.expm1(u) - u, 0)

    def backward(self, gy):
        """y = (e^u - 1) - u  ->  gx = gy · (e^u - 1) = gy · (r - 1)."""
        xp = backend.get_array_module(gy)
        return (gy * xp.expm1(self.u),)


# ===================================================================================================
# sigmoid family


class LogSigmoid(Function):
    def forward(self, x):
        xp = backend.get_array_module(x)
        self.x = x
        # log σ(x) = min(x, 0) - log(1 + e^-|x|): no overflow for any x
        return xp.minimum(x, 0) - xp.log1p(xp.exp(-xp.abs(x)))

    def backward(self, gy):
        """y = log σ(x)  ->  gx = gy · (1 - σ(x)) = gy · σ(-x)."""
        return (gy * stable_sigmoid(-self.x),)


def logsigmoid(x):
    return LogSigmoid()(x)


def sigmoid(x):
    return x.sigmoid()


# ===================================================================================================
# log(1 - e^a) and ORPO's odds ratio


_LN2 = math.log(2.0)


def _log1mexp(a):
    """log(1 - e^a) for a <= 0 on raw arrays, -inf at a = 0: log1p(-e^a) below -ln 2 and
    log(-expm1(a)) above, each where it keeps its digits (Mächler, 2012)."""
    xp = backend.get_array_module(a)
    m = -xp.expm1(a)                                                     # 1 - e^a, exact near 0
    near = xp.where(m > 0, xp.log(xp.where(m > 0, m, 1.0)), -xp.inf)     # log(0) = -inf, no warning
    far = xp.log1p(-xp.exp(xp.minimum(a, -_LN2)))
    return xp.where(a < -_LN2, far, near)


class Log1mExp(Function):
    """log(1 - e^a) for a <= 0 (a log-prob): the log-probability of *not* drawing a completion."""

    def forward(self, a):
        self.a = a
        return _log1mexp(a)

    def backward(self, gy):
        """y = log(1 - e^a)  ->  gx = gy · (-e^a / (1 - e^a))  (-inf at a = 0)."""
        xp = backend.get_array_module(gy)
        return (-gy * xp.exp(self.a) / xp.abs(xp.expm1(self.a)),)      # |expm1(a)| = 1 - e^a, exact


def log1mexp(a):
    return Log1mExp()(a)


class LogSigmoidOddsRatio(Function):
    """log σ(log odds(a_w) - log odds(a_l)), odds(a) = e^a / (1 - e^a), for log-probs a <= 0:
    ORPO's term, one node so that a certain chosen completion (a_w = 0) has a finite gradient."""

    def forward(self, a_w, a_l):
        xp = backend.get_array_module(a_w, a_l)
        self.a_w, self.a_l = a_w, a_l
        # log odds ratio: +inf at a_w = 0 (the loss term is then 0), -inf at a_l = 0
        self.log_odds = (a_w - a_l) - (_log1mexp(a_w) - _log1mexp(a_l))
        x = self.log_odds
        return xp.minimum(x, 0) - xp.log1p(xp.exp(-xp.abs(x)))          # log σ(x), as LogSigmoid

    def backward(self, gy):
        """y = log σ(z), z = a_w - log(1 - e^a_w) - a_l + log(1 - e^a_l), so with
        D = e^a_w·(1 - e^a_l) + e^a_l·(1 - e^a_w) (a sum of two terms >= 0, no cancellation):

            ∂y/∂a_w = σ(-z) / (1 - e^a_w) =  e^a_l / D               (e^a_l / (1 - e^a_l) at a_w = 0)
            ∂y/∂a_l = -σ(-z) / (1 - e^a_l) = -e^a_l·(1 - e^a_w) / ((1 - e^a_l)·D)

        from σ(-z) = odds_l / (odds_w + odds_l) = e^a_l·(1 - e^a_w) / D. Written this way the
        gradient stays finite at a_w = 0, where the chain rule through log(1 - e^a_w) meets 0·inf;
        at a_l = 0 the loss is infinite and so is ∂y/∂a_l.
        """
        xp = backend.get_array_module(gy)
        top = xp.maximum(self.a_w, self.a_l)                            # e^a / e^top: D cannot underflow
        e_w, e_l = xp.exp(self.a_w - top), xp.exp(self.a_l - top)
        m_w, m_l = -xp.expm1(self.a_w), -xp.expm1(self.a_l)             # 1 - e^a, exact near 0
        D = e_w * m_l + e_l * m_w                                        # D / e^top
        return gy * e_l / D, -gy * e_l * m_w / (m_l * D)


def logsigmoid_odds_ratio(chosen_logps, rejected_logps):
    """log σ(log(odds(a_w) / odds(a_l))) elementwise, for log-probs a_w, a_l <= 0 (ORPO)."""
    like = chosen_logps if isinstance(chosen_logps, Tensor) else rejected_logps
    return LogSigmoidOddsRatio()(as_tensor(chosen_logps, like=like),
                                 as_tensor(rejected_logps, like=like))


# ===================================================================================================
# layers


class Linear(Function):
    def forward(self, x, weight, bias=None):
        self.x, self.weight, self.has_bias = x, weight, bias is not None
        y = kernels.affine_rows(x.reshape(-1, x.shape[-1]), weight, bias)   # x W + b, (rows, out)
        return y.reshape(x.shape[:-1] + weight.shape[-1:])

    def backward(self, gy):
        """y = x W + b over the rows of x (..., in), W (in, out):

        gx = gy Wᵀ,  gW = Σ_rows xᵀ gy,  gb = Σ_rows gy.
        """
        x2 = self.x.reshape(-1, self.x.shape[-1])                    # (rows, in)
        gy2 = gy.reshape(-1, gy.shape[-1])                           # (rows, out)
        gx, *g_weight_bias = kernels.affine_rows_grads(x2, self.weight, gy2, self.has_bias)
        return (gx.reshape(self.x.shape), *g_weight_bias)


def linear(x, weight, bias=None):
    """``x @ weight + bias`` for x (..., in), weight (in, out), bias (out,): one fused node.
    Plain version: `reference.linear`."""
    if weight.ndim != 2 or x.shape[-1] != weight.shape[0] or (
            bias is not None and bias.shape != weight.shape[1:]):
        raise ValueError(f"linear: x {x.shape}, weight {weight.shape} and bias "
                         f"{None if bias is None else bias.shape} do not fit: need x (..., in), "
                         "weight (in, out), bias (out,)")
    return Linear()(x, weight) if bias is None else Linear()(x, weight, bias)


class LayerNorm(Function):
    def __init__(self, eps):
        self.eps = eps

    def forward(self, x, weight, bias):
        x2 = x.reshape(-1, x.shape[-1])                              # (N, C): one row per position
        xhat, self.mu, self.rstd = kernels.normalize_rows(x2, self.eps)   # (x - μ) / sqrt(σ² + eps)
        self.x2, self.weight = x2, weight    # x̂ is remade from x in backward: x is kept anyway
        y = xhat * weight                                            # x̂ w + b, (N, C)
        y += bias
        return y.reshape(x.shape)

    def backward(self, gy):
        """y = x̂ w + b, x̂ = (x - μ) / sqrt(σ² + eps), over the last axis of size C:

        gw = Σ_rows gy x̂,  gb = Σ_rows gy,
        gx = rstd · (g - mean(g) - x̂ · mean(g x̂))  with g = gy w and rstd = 1 / sqrt(σ² + eps).
        """
        gy2 = gy.reshape(-1, gy.shape[-1])                           # (N, C)
        xhat = kernels.normalized_again(self.x2, self.mu, self.rstd)
        gx, gw, gb = kernels.layer_norm_grads(gy2, xhat, self.weight, self.rstd)
        return gx.reshape(gy.shape), gw, gb


def layer_norm(x, weight, bias, eps=1e-5):
    """Normalise the last axis to zero mean and unit variance, then scale and shift.
    Plain version: `reference.layer_norm`."""
    C = x.shape[-1]
    if weight.shape != (C,) or bias.shape != (C,):
        raise ValueError(f"layer_norm: weight {weight.shape} and bias {bias.shape} must both have "
                         f"shape ({C},) for input of shape {x.shape}")
    return LayerNorm(eps)(x, weight, bias)


class GELU(Function):
    """GELU in its tanh form, computed through a sigmoid: ½ x (1 + tanh u) = x · σ(2u)."""

    def forward(self, x):
        self.x = x
        y, self.s = kernels.gelu_tanh(x)                             # x σ(2u), σ(2u) or None
        return y

    def backward(self, gy):
        """y = ½ x (1 + tanh u) = x σ(2u),  u = √(2/π) (x + 0.044715 x³):

        dy/dx = σ(2u) + x · 2σ(2u)(1 - σ(2u)) · √(2/π) (1 + 3 · 0.044715 x²)
        (the same as ½ (1 + tanh u) + ½ x (1 - tanh² u) u', since tanh u = 2σ(2u) - 1).
        """
        return (kernels.gelu_tanh_grad(self.x, gy, self.s),)


def gelu(x):
    """GELU in the tanh approximation that GPT-2 uses. Plain version: `reference.gelu`."""
    return GELU()(x)


class RMSNorm(Function):
    def __init__(self, eps):
        self.eps = eps

    def forward(self, x, weight):
        xp = backend.get_array_module(x)
        x2 = x.reshape(-1, x.shape[-1])                              # (N, C)
        wide = x2.astype(xp.promote_types(x2.dtype, xp.float32), copy=False)   # LlamaRMSNorm's upcast
        rstd = 1 / xp.sqrt((wide * wide).mean(axis=-1, keepdims=True) + self.eps)   # (N, 1)
        self.xhat, self.rstd, self.weight = (wide * rstd).astype(x.dtype, copy=False), rstd, weight
        return (self.xhat * weight).reshape(x.shape)                 # x̂ w, (..., C)

    def backward(self, gy):
        """y = x̂ w, x̂ = x · rstd, rstd = 1 / sqrt(mean(x²) + eps) over the last axis:

        gw = Σ_rows gy x̂,   gx = rstd · (g - x̂ · mean(g x̂))  with g = gy w
        (the LayerNorm gradient without the mean terms: nothing is subtracted from x).
        """
        gy2 = gy.reshape(-1, gy.shape[-1])                           # (N, C)
        gw = (gy2 * self.xhat).sum(axis=0)
        g = gy2 * self.weight
        gx = self.rstd.astype(gy.dtype) * (g - self.xhat * (g * self.xhat).mean(axis=-1, keepdims=True))
        return gx.reshape(gy.shape), gw


def rms_norm(x, weight, eps=1e-6):
    """x / sqrt(mean(x²) + eps) · weight over the last axis (Llama's RMSNorm: no mean subtracted,
    no bias). As transformers' LlamaRMSNorm, the statistic is computed in float32 at least (a float16
    input is upcast and the result cast back; float32 and float64 compute in their own dtype).
    Plain version: `reference.rms_norm`."""
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight {weight.shape} must have shape ({x.shape[-1]},) for "
                         f"input of shape {x.shape}")
    return RMSNorm(eps)(x, weight)


class SiLU(Function):
    def forward(self, x):
        self.x, self.s = x, stable_sigmoid(x)
        return x * self.s

    def backward(self, gy):
        """y = x σ(x)  ->  gx = gy · σ(x) (1 + x (1 - σ(x)))."""
        s = self.s
        return (gy * s * (1 + self.x * (1 - s)),)


def silu(x):
    """SiLU (swish): x σ(x), the gate of Llama's SwiGLU MLP. Plain version: `reference.silu`."""
    return SiLU()(x)


def _rotate_half(x, sign=1):
    """(-x2, x1) of x = (x1, x2) split in halves along the last axis; sign=-1 gives (x2, -x1),
    its transpose (and inverse)."""
    xp = backend.get_array_module(x)
    h = x.shape[-1] // 2
    return xp.concatenate([-sign * x[..., h:], sign * x[..., :h]], axis=-1)


class Rope(Function):
    def __init__(self, cos, sin):
        self.cos, self.sin = cos, sin

    def forward(self, x):
        return x * self.cos + _rotate_half(x) * self.sin             # (B, nh, T, hs)

    def backward(self, gy):
        """y = x·cos + rotate_half(x)·sin, rotate_half a fixed signed permutation P:

        gx = gy·cos + Pᵀ(gy·sin),  Pᵀ(g1, g2) = (g2, -g1).
        """
        return (gy * self.cos + _rotate_half(gy * self.sin, sign=-1),)


def rope(q, k, positions, theta=10000.0, scaling=None):
    """Rotary position embeddings of queries and keys (B, nh, T, hs) at integer ``positions``
    (T,) or (B, T), in the rotate-half convention of transformers' Llama (`minirlhf.rotary` says
    why it is the paper's rotation up to a permutation). The cos/sin tables are cached. Returns
    (q, k) rotated. Plain version: `reference.rope`."""
    q = as_tensor(q)
    cos, sin = rotary.cos_sin(array_of(positions, backend.get_array_module(q.data)), q.shape[-1],
                              theta, q.dtype, scaling)
    return apply_rope(q, k, cos, sin)


def apply_rope(q, k, cos, sin):
    """`rope` with its tables already looked up (`rotary.cos_sin`): what a model does once per
    forward pass for all its layers."""
    return Rope(cos, sin)(as_tensor(q)), Rope(cos, sin)(as_tensor(k))


class RepeatKV(Function):
    def __init__(self, n_rep):
        self.n_rep = n_rep

    def forward(self, x):
        xp = backend.get_array_module(x)
        B, n_kv, T, hs = x.shape
        y = xp.broadcast_to(x[:, :, None], (B, n_kv, self.n_rep, T, hs))
        return y.reshape(B, n_kv * self.n_rep, T, hs)               # (B, nh, T, hs)

    def backward(self, gy):
        """y[:, j] = x[:, j // n_rep]  ->  gx[:, g] = Σ_{r < n_rep} gy[:, g·n_rep + r]
        (each kv head's gradient sums over the query heads of its group)."""
        B, nh, T, hs = gy.shape
        return (gy.reshape(B, nh // self.n_rep, self.n_rep, T, hs).sum(axis=2),)


def repeat_kv(x, n_rep):
    """Grouped-query attention's sharing: keys or values of n_kv heads (B, n_kv, T, hs) -> n_kv·n_rep
    heads (B, nh, T, hs), query head j reading kv head j // n_rep (transformers' ``repeat_kv``).
    n_rep = 1 is the identity. Plain version: `reference.repeat_kv`."""
    x = as_tensor(x)
    return x if n_rep == 1 else RepeatKV(n_rep)(x)


class Embedding(Function):
    def __init__(self, ids):
        self.ids = ids

    def forward(self, weight):
        self.num_rows = weight.shape[0]
        return weight[self.ids]

    def backward(self, gy):
        """y[i] = W[ids[i]]  ->  gW[v] = Σ_{i: ids[i] = v} gy[i] (rows of repeated ids add up)."""
        C = gy.shape[-1]
        gw = backend.rows_scatter_add(self.num_rows, self.ids.reshape(-1), gy.reshape(-1, C))
        return (gw,)


def embedding(ids, weight, *, check=True):
    """Rows of ``weight`` (V, C) picked by integer ``ids`` (...): the result has shape (..., C).

    ``check``: refuse ids outside [0, V). On a GPU the check is a few kernels and a wait for the
    device to answer, so a caller whose ids are known to be in range passes False (the GPT checks
    its token ids once a forward and makes its position ids itself).
    Plain version: `reference.embedding`.
    """
    ids = array_of(ids, backend.get_array_module(weight.data))
    if ids.dtype.kind not in "iu":
        raise TypeError(f"embedding: ids must be integers, got dtype {ids.dtype}")
    if check:
        check_ids(ids, weight.shape[0], "embedding: id")
    return Embedding(ids)(weight)


# ===================================================================================================
# attention


class CausalAttention(Function):
    def __init__(self, allowed=None):
        self.allowed = allowed

    def forward(self, q, k, v):
        """y = P v,  P = softmax(s),  s = q kᵀ / √hs with future keys (or those ``allowed`` hides)
        at -inf."""
        self.q, self.k, self.v = (kernels.compact_rows(a) for a in (q, k, v))
        self.scale = q.dtype.type(1 / math.sqrt(q.shape[-1]))
        self.y, self.P = kernels.attention(self.q, self.k, self.v, self.scale, self.allowed)
        return self.y                                                # (B, nh, Tq, hs)

    def backward(self, gy):
        """y = P v,  P = softmax(s),  s = q kᵀ / √hs with future keys masked out:

        gv = Pᵀ gy,  gP = gy vᵀ,  gs = P ⊙ (gP - Σ_j gP_j P_j),  gq = gs k / √hs,  gk = gsᵀ q / √hs
        (masked places have P = 0, so they pass no gradient). Σ_j gP_j P_j = Σ_j (gy · v_j) P_j
        = gy · y, a sum over hs numbers instead of Tk.
        """
        return kernels.attention_grads(self.q, self.k, self.v, self.y, gy, self.scale, self.allowed,
                                       self.P)


class SelfAttention(Function):
    """Multi-head causal self-attention from one packed projection, as one node.

    The same as splitting ``qkv`` (B, T, 3C) into q, k, v and those into heads, `causal_attention`
    per head, and putting the heads side by side again (B, T, C); but as three slices of ``qkv``,
    q, k and v would each send back a zero-filled (B, T, 3C) gradient for the engine to add up.
    """

    def __init__(self, n_head):
        self.n_head = n_head

    def forward(self, qkv):
        xp = backend.get_array_module(qkv)
        B, T, C3 = qkv.shape
        nh, hs = self.n_head, C3 // 3 // self.n_head
        heads = qkv.reshape(B, T, 3, nh, hs).transpose(2, 0, 3, 1, 4)   # (3, B, nh, T, hs)
        self.q, self.k, self.v = xp.ascontiguousarray(heads)         # compact rows for the GEMMs
        self.scale = qkv.dtype.type(1 / math.sqrt(hs))
        y, self.P = kernels.attention(self.q, self.k, self.v, self.scale)   # (B, nh, T, hs)
        # heads side by side, (B, T, C): a copy, kept for the backward in place of y itself
        self.out = y.transpose(0, 2, 1, 3).reshape(B, T, C3 // 3)
        return self.out

    def backward(self, gy):
        """y = merge_heads(attention(q, k, v)),  (q, k, v) = split_heads(qkv):

        gq, gk, gv = `CausalAttention.backward` of split_heads(gy), and g_qkv puts them back where
        q, k and v came from (the inverse of the split: every number of qkv is in exactly one of them).
        """
        xp = backend.get_array_module(gy)
        B, T, C = gy.shape
        nh, hs = self.n_head, C // self.n_head
        g_heads = xp.empty((3, B, nh, T, hs), gy.dtype)             # gq, gk, gv laid out as heads
        y = self.out.reshape(B, T, nh, hs).transpose(0, 2, 1, 3)    # (B, nh, T, hs) views
        gy = gy.reshape(B, T, nh, hs).transpose(0, 2, 1, 3)
        kernels.attention_grads(self.q, self.k, self.v, y, gy, self.scale, P=self.P, out=g_heads)
        g_qkv = g_heads.transpose(1, 3, 0, 2, 4)                     # (B, T, 3, nh, hs)
        return (g_qkv.reshape(B, T, 3 * C),)                         # the split undone: one copy


def self_attention(qkv, n_head):
    """Causal self-attention of ``qkv`` (B, T, 3C), q, k and v side by side as a GPT's ``c_attn``
    makes them, with ``n_head`` heads: (B, T, C). One fused node; see `causal_attention` for one
    head's formula and for attention with a KV cache or a mask. Plain version:
    `reference.self_attention`."""
    B, T, C3 = qkv.shape
    if C3 % 3 or (C3 // 3) % n_head:
        raise ValueError(f"self_attention: the last axis of qkv {qkv.shape} must be 3·C with C "
                         f"divisible by n_head={n_head}")
    return SelfAttention(n_head)(as_tensor(qkv))


def causal_attention(q, k, v, mask=None):
    """softmax(q kᵀ / √hs + causal mask) v for q (..., Tq, hs) and k, v (..., Tk, hs), Tq <= Tk.

    With a KV cache the Tq new queries are the last Tq positions of the Tk keys. ``mask``, a
    boolean array broadcastable to (..., Tq, Tk) that is True where a query may attend, replaces
    the causal mask (it must include causality; generation uses it to keep left padding out of
    attention). Every query must be allowed at least one key. Plain version:
    `reference.causal_attention`.
    """
    if (q.shape[-2] > k.shape[-2] or k.shape != v.shape or q.shape[-1] != k.shape[-1]
            or q.shape[:-2] != k.shape[:-2]):
        raise ValueError(f"causal_attention: q {q.shape}, k {k.shape}, v {v.shape} do not fit "
                         "(need Tq <= Tk, k and v of one shape, one head size, and the same "
                         "leading (batch, head) axes as q: expand k and v to q's batch first)")
    return CausalAttention(mask)(as_tensor(q), as_tensor(k), as_tensor(v))
