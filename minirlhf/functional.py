"""Fused, numerically stable ops with hand-derived backward passes.

Each could be composed from the primitives in `ops.py`, but composing them would overflow (``exp``
of a logit of 1e4), keep many temporaries alive for backward, and be slow. Here each is one node whose
backward is written from its derivative, stated in the docstring, and checked by `gradcheck`.
Each has a plain version in `reference.py`, the same equation written with the primitives (autograd
doing the backward): read that one first; tests/test_reference.py checks that the two agree.

    import minirlhf.functional as F
"""

import math

from . import backend, cpu
from .ops import as_tensor, stable_sigmoid
from .tensor import Function, Tensor

# ===================================================================================================
# softmax family


def _log_softmax(x, axis, out=None):
    """log softmax(x) = (x - max x) - log Σ exp(x - max x) of a raw array: shifting by the max
    keeps ``exp`` from overflowing. ``out``: an array to write the result into."""
    xp = backend.get_array_module(x)
    shifted = xp.subtract(x, x.max(axis=axis, keepdims=True), out=out)
    shifted -= xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
    return shifted


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
        self.y = _log_softmax(x, self.axis)
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
        flat = logits.reshape(-1, V)                                  # (N, V)
        t = self.targets.reshape(-1)                                  # (N,)
        self.valid = t != self.ignore_index
        safe_t = xp.where(self.valid, t, 0)
        logp = xp.empty(flat.shape, flat.dtype)                       # (N, V)

        def rows(lo, hi):                                             # log softmax of rows lo:hi
            _log_softmax(flat[lo:hi], axis=-1, out=logp[lo:hi])

        cpu.for_rows(rows, flat.shape[0], V, xp=xp)
        nll = -logp[xp.arange(t.shape[0]), safe_t] * self.valid       # (N,)
        self.logp, self.safe_t, self.shape = logp, safe_t, logits.shape
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
        g = xp.empty(self.logp.shape, self.logp.dtype)                # (N, V)

        def rows(lo, hi):                                             # softmax · scale, rows lo:hi
            xp.exp(self.logp[lo:hi], out=g[lo:hi])
            g[lo:hi] *= scale[lo:hi]

        cpu.for_rows(rows, g.shape[0], g.shape[1], xp=xp)
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
    xp = backend.get_array_module(logits.data)
    t = targets.data if isinstance(targets, Tensor) else xp.asarray(targets)
    if t.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: targets must be integers, got dtype {t.dtype}")
    if t.shape != logits.shape[:-1]:
        raise ValueError(f"cross_entropy: targets of shape {tuple(t.shape)} do not match logits of "
                         f"shape {logits.shape} (expected {logits.shape[:-1]})")
    _check_ids(t, logits.shape[-1], "cross_entropy: target", ignore=ignore_index)
    return CrossEntropy(t, ignore_index, reduction)(logits)


def _check_ids(ids, n, what, ignore=None):
    """Refuse ids outside [0, n): CuPy would silently wrap them around instead of failing."""
    if ids.size == 0:
        return
    bad = (ids < 0) | (ids >= n)
    if ignore is not None:
        bad &= ids != ignore
    if bool(bad.any()):
        value = int(ids[bad].reshape(-1)[0])
        raise IndexError(f"{what} {value} is out of range for size {n}")


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
# layers


class Linear(Function):
    def forward(self, x, weight, bias=None):
        xp = backend.get_array_module(x)
        self.x, self.weight, self.has_bias = x, weight, bias is not None
        x2 = x.reshape(-1, x.shape[-1])                              # (rows, in)
        y = xp.empty((x2.shape[0], weight.shape[1]), xp.result_type(x, weight))   # (rows, out)

        def rows(lo, hi):                                            # one GEMM per block of rows
            block = y[lo:hi]
            xp.matmul(x2[lo:hi], weight, out=block)
            if bias is not None:
                block += bias                  # in place (`y[lo:hi] += bias` would copy it back)

        cpu.for_rows(rows, x2.shape[0], weight.size, blas=True, shared_weight=True, xp=xp)
        return y.reshape(x.shape[:-1] + weight.shape[-1:])

    def backward(self, gy):
        """y = x W + b over the rows of x (..., in), W (in, out):

        gx = gy Wᵀ,  gW = Σ_rows xᵀ gy,  gb = Σ_rows gy.
        """
        xp = backend.get_array_module(gy)
        gy2 = gy.reshape(-1, gy.shape[-1])                           # (rows, out)
        x2 = self.x.reshape(-1, self.x.shape[-1])                    # (rows, in)
        gx = xp.empty(x2.shape, xp.result_type(gy, self.weight))

        def rows(lo, hi):                                            # gx's rows, and the rows'
            xp.matmul(gy2[lo:hi], self.weight.T, out=gx[lo:hi])      # share of the sums gW, gb
            gw = x2[lo:hi].T @ gy2[lo:hi]
            return (gw, backend.sum_first(gy2[lo:hi])) if self.has_bias else (gw,)

        sums = cpu.add_up(cpu.for_rows(rows, gy2.shape[0], self.weight.size, blas=True,
                                       shared_weight=True, xp=xp))
        return (gx.reshape(self.x.shape),) + sums


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
    """On the CPU its sums and means are matrix-vector products (`backend.mean_last`,
    `backend.sum_first`), run on one OpenBLAS thread (`cpu.blas_on_one_thread` says why)."""

    def __init__(self, eps):
        self.eps = eps

    def forward(self, x, weight, bias):
        xp = backend.get_array_module(x)
        x2 = x.reshape(-1, x.shape[-1])                              # (N, C): one row per position
        with cpu.blas_on_one_thread(size=x2.size):
            xhat = x2 - backend.mean_last(x2)[:, None]               # x - μ
            var = backend.mean_last(xp.square(xhat))                 # σ², (N,)
        self.rstd = ((var + x.dtype.type(self.eps)) ** -0.5)[:, None]   # 1 / sqrt(σ² + eps), (N, 1)
        xhat *= self.rstd                                            # x̂, in place
        self.xhat, self.weight = xhat, weight
        y = xhat * weight
        y += bias
        return y.reshape(x.shape)

    def backward(self, gy):
        """y = x̂ w + b, x̂ = (x - μ) / sqrt(σ² + eps), over the last axis of size C:

        gw = Σ_rows gy x̂,  gb = Σ_rows gy,
        gx = rstd · (g - mean(g) - x̂ · mean(g x̂))  with g = gy w.
        """
        xp = backend.get_array_module(gy)
        xhat, w, C = self.xhat, self.weight, self.xhat.shape[-1]
        gy2 = gy.reshape(-1, C)                                      # (N, C)
        gy_xhat = gy2 * xhat                                         # (N, C)
        w_over_C = w / C                                             # (C,)
        with cpu.blas_on_one_thread(size=gy2.size):
            gw, gb = backend.sum_first(gy_xhat), backend.sum_first(gy2)  # Σ_rows gy x̂, Σ_rows gy
            mean_g = gy2 @ w_over_C                                  # mean(g), (N,): g = gy w
            mean_g_xhat = gy_xhat @ w_over_C                         # mean(g x̂), (N,)
        gx = gy2 * w                                                 # g
        gx -= mean_g[:, None]
        gx -= xp.multiply(xhat, mean_g_xhat[:, None], out=gy_xhat)  # x̂ · mean(g x̂)
        gx *= self.rstd
        return gx.reshape(gy.shape), gw, gb


def layer_norm(x, weight, bias, eps=1e-5):
    """Normalise the last axis to zero mean and unit variance, then scale and shift.
    Plain version: `reference.layer_norm`."""
    C = x.shape[-1]
    if weight.shape != (C,) or bias.shape != (C,):
        raise ValueError(f"layer_norm: weight {weight.shape} and bias {bias.shape} must both have "
                         f"shape ({C},) for input of shape {x.shape}")
    return LayerNorm(eps)(x, weight, bias)


_GELU_C = math.sqrt(2 / math.pi)


class GELU(Function):
    """GELU in its tanh form, computed through a sigmoid: ½ x (1 + tanh u) = x · σ(2u).

    (tanh is several times slower than exp in NumPy's float32, and a (B, T, 4C) activation is the
    largest array of a GPT block, so the sigmoid form and in-place updates pay.)
    """

    def forward(self, x):
        xp = backend.get_array_module(x)
        c, a = x.dtype.type(_GELU_C), x.dtype.type(0.044715)
        self.x = x
        x, s, y = x.reshape(-1), xp.empty(x.size, x.dtype), xp.empty(x.size, x.dtype)   # flat

        def rows(lo, hi):                          # elements lo:hi (blocks of cpu.BLOCK_NUMBERS)
            xb, e = x[lo:hi], s[lo:hi]
            xp.multiply(xb, xb, out=e)             # -2u = -2√(2/π)(x + a x³) = x(-2c - 2c·a·x²)
            e *= -2 * c * a
            e -= 2 * c
            e *= xb
            xp.clip(e, -80, 80, out=e)             # exp(80) is finite in float32; σ is 0 or 1 there
            xp.exp(e, out=e)
            e += 1
            xp.divide(1, e, out=e)                 # s = σ(2u) = 1 / (1 + e^(-2u))
            xp.multiply(xb, e, out=y[lo:hi])       # y = x σ(2u)

        cpu.for_rows(rows, x.size, 1, xp=xp)
        self.s = s
        return y.reshape(self.x.shape)

    def backward(self, gy):
        """y = ½ x (1 + tanh u) = x σ(2u),  u = √(2/π) (x + 0.044715 x³):

        dy/dx = σ(2u) + x · 2σ(2u)(1 - σ(2u)) · √(2/π) (1 + 3 · 0.044715 x²)
        (the same as ½ (1 + tanh u) + ½ x (1 - tanh² u) u', since tanh u = 2σ(2u) - 1).
        """
        xp = backend.get_array_module(gy)
        x, s, gy = self.x.reshape(-1), self.s, gy.reshape(-1)
        c, a = x.dtype.type(_GELU_C), x.dtype.type(0.044715)
        gx = xp.empty(x.size, x.dtype)

        def rows(lo, hi):
            xb, sb, g = x[lo:hi], s[lo:hi], gx[lo:hi]
            xp.multiply(xb, xb, out=g)             # 2x · c(1 + 3a x²)
            g *= 6 * c * a
            g += 2 * c
            g *= xb
            g *= sb                                # · σ(1 - σ)
            g *= 1 - sb
            g += sb                                # + σ
            g *= gy[lo:hi]

        cpu.for_rows(rows, x.size, 1, xp=xp)
        return (gx.reshape(self.x.shape),)


def gelu(x):
    """GELU in the tanh approximation that GPT-2 uses. Plain version: `reference.gelu`."""
    return GELU()(x)


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
    xp = backend.get_array_module(weight.data)
    ids = ids.data if isinstance(ids, Tensor) else xp.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"embedding: ids must be integers, got dtype {ids.dtype}")
    if check:
        _check_ids(ids, weight.shape[0], "embedding: id")
    return Embedding(ids)(weight)


# ===================================================================================================
# attention


class CausalAttention(Function):
    def __init__(self, allowed=None):
        self.allowed = allowed

    def forward(self, q, k, v):
        xp = backend.get_array_module(q)
        # heads split out of one (B, T, 3C) projection are views whose rows are far apart; batched
        # GEMMs on compact copies are several times faster, forward and backward (a KV cache's
        # slices already have compact rows and are not copied)
        q, k, v = (a if a.strides[-2] == a.shape[-1] * a.itemsize and a.strides[-1] == a.itemsize
                   else xp.ascontiguousarray(a) for a in (q, k, v))
        Tq, Tk, hs = q.shape[-2], k.shape[-2], q.shape[-1]
        self.scale = q.dtype.type(1 / math.sqrt(hs))
        self.q, self.k, self.v = q, k, v
        self.att = xp.empty(q.shape[:-1] + (Tk,), q.dtype)           # P, (B, nh, Tq, Tk)
        y = xp.empty(q.shape, q.dtype)                               # (B, nh, Tq, hs)

        def rows(lo, hi):                                            # batch rows lo:hi
            q, k, v, att = self._rows(lo, hi, self.q, self.k, self.v, self.att)
            # s = (q / √hs) kᵀ: scaling q (…, T, hs) is cheaper than scaling s (…, T, T)
            xp.matmul(q * self.scale, xp.swapaxes(k, -1, -2), out=att)
            if self.allowed is None:
                if Tq > 1:                                           # (one new query sees all keys)
                    att += _causal_bias(xp, Tq, Tk, att.dtype)       # -inf on future keys
            else:
                allowed, = self._rows(lo, hi, self.allowed)
                att[...] = xp.where(allowed, att, att.dtype.type(-xp.inf))
            att -= att.max(axis=-1, keepdims=True)
            xp.exp(att, out=att)
            att /= backend.sum_last(att)[..., None]                  # softmax, in place
            xp.matmul(att, v, out=self._rows(lo, hi, y)[0])          # y = P v

        self._for_batch_rows(rows, xp)
        return y

    def backward(self, gy):
        """y = P v,  P = softmax(s),  s = q kᵀ / √hs with future keys masked out:

        gv = Pᵀ gy,  gP = gy vᵀ,  gs = P ⊙ (gP - Σ_j gP_j P_j),  gq = gs k / √hs,  gk = gsᵀ q / √hs
        (masked places have P = 0, so they pass no gradient).
        """
        xp = backend.get_array_module(gy)
        gq, gk, gv = xp.empty_like(self.q), xp.empty_like(self.k), xp.empty_like(self.v)
        self.grads_into(gy, gq, gk, gv)
        return gq, gk, gv

    def grads_into(self, gy, gq, gk, gv):
        """`backward`, writing gq, gk and gv into the given arrays (shaped like q, k and v)."""
        xp = backend.get_array_module(gy)

        def rows(lo, hi):                                            # batch rows lo:hi
            q, k, v, P, gy_, gq_, gk_, gv_ = self._rows(lo, hi, self.q, self.k, self.v, self.att,
                                                       gy, gq, gk, gv)
            xp.matmul(xp.swapaxes(P, -1, -2), gy_, out=gv_)          # (B, nh, Tk, hs)
            gs = gy_ @ xp.swapaxes(v, -1, -2)                        # gP, (B, nh, Tq, Tk)
            gs -= backend.sum_last(gs * P)[..., None]                # gs = P ⊙ (gP - Σ gP P)
            gs *= P
            xp.matmul(gs, k, out=gq_)                                # 1/√hs applied to the small
            gq_ *= self.scale                                        # (…, T, hs) results
            xp.matmul(xp.swapaxes(gs, -1, -2), q, out=gk_)
            gk_ *= self.scale

        self._for_batch_rows(rows, xp)

    def _for_batch_rows(self, rows, xp):
        """Run ``rows(lo, hi)`` over blocks of the leading (batch) axis, on CPU threads."""
        q, k = self.q, self.k
        splittable = q.ndim >= 3 and q.shape[:-2] == k.shape[:-2]
        if not splittable:
            rows(0, None)                                            # everything in one block
            return
        per_row = self.att[:1].size * q.shape[-1]                    # multiply-adds of one row
        cpu.for_rows(rows, q.shape[0], per_row, blas=True, xp=xp)

    def _rows(self, lo, hi, *arrays):
        """Each array's batch rows lo:hi; an array (a mask) broadcast along that axis is kept."""
        if hi is None:
            return arrays
        n = self.q.shape[0]
        return tuple(a[lo:hi] if a.ndim == self.q.ndim and a.shape[0] == n and n > 1 else a
                     for a in arrays)


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
        heads = xp.ascontiguousarray(heads)                          # compact rows for the GEMMs
        self.attention = CausalAttention()
        y = self.attention.forward(heads[0], heads[1], heads[2])    # (B, nh, T, hs)
        return y.transpose(0, 2, 1, 3).reshape(B, T, C3 // 3)       # (B, T, C): heads side by side

    def backward(self, gy):
        """y = merge_heads(attention(q, k, v)),  (q, k, v) = split_heads(qkv):

        gq, gk, gv = `CausalAttention.backward` of split_heads(gy), and g_qkv puts them back where
        q, k and v came from (the inverse of the split: every number of qkv is in exactly one of them).
        """
        xp = backend.get_array_module(gy)
        B, T, C = gy.shape
        nh, hs = self.n_head, C // self.n_head
        g_heads = xp.empty((3, B, nh, T, hs), gy.dtype)             # gq, gk, gv laid out as heads
        self.attention.grads_into(gy.reshape(B, T, nh, hs).transpose(0, 2, 1, 3), *g_heads)
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


_CAUSAL_BIAS = {}


def _causal_bias(xp, Tq, Tk, dtype):
    """(Tq, Tk): 0 where query i may see key j, -inf on the future. Query i sits at absolute
    position Tk - Tq + i, after every cached key. Built once per shape and reused."""
    key = (xp.__name__, Tq, Tk, dtype)
    if key not in _CAUSAL_BIAS:
        future = xp.triu(xp.ones((Tq, Tk), dtype=bool), k=Tk - Tq + 1)
        _CAUSAL_BIAS[key] = xp.where(future, dtype.type(-xp.inf), dtype.type(0))
    return _CAUSAL_BIAS[key]


def causal_attention(q, k, v, mask=None):
    """softmax(q kᵀ / √hs + causal mask) v for q (..., Tq, hs) and k, v (..., Tk, hs), Tq <= Tk.

    With a KV cache the Tq new queries are the last Tq positions of the Tk keys. ``mask``, a
    boolean array broadcastable to (..., Tq, Tk) that is True where a query may attend, replaces
    the causal mask (it must include causality; generation uses it to keep left padding out of
    attention). Every query must be allowed at least one key. Plain version:
    `reference.causal_attention`.
    """
    if q.shape[-2] > k.shape[-2] or k.shape != v.shape or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"causal_attention: q {q.shape}, k {k.shape}, v {v.shape} do not fit "
                         "(need Tq <= Tk, k and v of one shape, one head size)")
    return CausalAttention(mask)(as_tensor(q), as_tensor(k), as_tensor(v))
