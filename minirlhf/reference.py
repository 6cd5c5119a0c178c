"""The plain version of every fused op: read these first.

Each function here computes what its namesake in `functional.py` computes, written as its equation
with the primitive ops of `ops.py` (Tensor methods), so autograd derives the backward and no
gradient is written by hand. The fused ops give the same numbers faster and in less memory;
``tests/test_reference.py`` checks that the two agree, value and gradient.

    import minirlhf.reference as plain
    GPT(GPTConfig(fused=False))          # a GPT built from these functions

`adamw_step` is the plain form of `minirlhf.optim.AdamW`'s update, on the arrays of one parameter.
"""

import math

from . import backend, rotary
from .ops import as_tensor, concatenate, where
from .tensor import array_of


def linear(x, weight, bias=None):
    """y = x W + b for x (..., in), W (in, out), b (out,)."""
    y = x @ weight                                             # (..., out)
    if bias is not None:
        y = y + bias                                           # (..., out)
    return y


def softmax(x, axis=-1):
    """softmax(x)_i = exp(x_i) / Σ_j exp(x_j); shifting x by its max (a constant, so detached)
    keeps exp from overflowing and changes nothing else."""
    e = (x - x.max(axis=axis, keepdims=True).detach()).exp()   # (..., V)
    return e / e.sum(axis=axis, keepdims=True)                 # (..., V)


def log_softmax(x, axis=-1):
    """log softmax(x)_i = x_i - log Σ_j exp(x_j), with the same shift as `softmax`."""
    shifted = x - x.max(axis=axis, keepdims=True).detach()     # (..., V)
    return shifted - shifted.exp().sum(axis=axis, keepdims=True).log()   # (..., V)


def cross_entropy(logits, targets, ignore_index=-100, reduction="mean"):
    """L_i = -log softmax(z_i)[t_i] for logits z (..., V) and integer targets t (...); rows whose
    target is ``ignore_index`` give 0 and are left out of the mean's count."""
    xp = backend.get_array_module(logits.data)
    t = array_of(targets, xp)                                  # (...)
    valid = t != ignore_index                                  # (...)
    V = logits.shape[-1]
    onehot = xp.arange(V) == xp.where(valid, t, 0)[..., None]  # (..., V): True at t_i
    logp = log_softmax(logits, axis=-1)                        # (..., V)
    nll = -(logp * onehot.astype(logp.dtype)).sum(axis=-1)     # (...): -log p(t_i)
    nll = nll * valid.astype(logp.dtype)                       # (...): 0 where ignored
    if reduction == "none":
        return nll
    if reduction == "sum":
        return nll.sum()
    return nll.sum() / int(valid.sum())                        # (): mean over the kept rows


def embedding(ids, weight):
    """y[i] = W[ids[i]]: rows of W (V, C) picked by integer ids (...) -> (..., C)."""
    xp = backend.get_array_module(weight.data)
    return weight[array_of(ids, xp)]                           # (..., C)


def layer_norm(x, weight, bias, eps=1e-5):
    """y = (x - μ) / sqrt(σ² + eps) · w + b, with μ and σ² the mean and variance of the last axis."""
    mu = x.mean(axis=-1, keepdims=True)                        # (..., 1)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)         # (..., 1)
    xhat = (x - mu) / (var + eps).sqrt()                       # (..., C)
    return xhat * weight + bias                                # (..., C)


def gelu(x):
    """GELU, tanh form (GPT-2's): ½ x (1 + tanh(√(2/π) (x + 0.044715 x³)))."""
    u = math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)      # (...)
    return 0.5 * x * (1 + u.tanh())                            # (...)


def rms_norm(x, weight, eps=1e-6):
    """y = x / sqrt(mean(x²) + eps) · w over the last axis (Llama's RMSNorm). transformers' LlamaRMSNorm
    computes this in float32 and casts back; for float32 and float64 inputs, the dtypes minirlhf
    computes in, that is computing in the input's own dtype, as here."""
    ms = (x * x).mean(axis=-1, keepdims=True)                  # (..., 1) mean square
    return x / (ms + eps).sqrt() * weight                      # (..., C)


def silu(x):
    """SiLU: x σ(x)."""
    return x * x.sigmoid()


def rotate_half(x):
    """(x1, x2) -> (-x2, x1), the halves of the last axis: a quarter turn of each pair (x_i, x_{i+hs/2})."""
    h = x.shape[-1] // 2
    return concatenate([-x[..., h:], x[..., :h]], axis=-1)


def rope(q, k, positions, theta=10000.0, scaling=None):
    """Rotary position embeddings of q and k (B, nh, T, hs): x·cos(mθ) + rotate_half(x)·sin(mθ) at
    positions m (T,) or (B, T); see `minirlhf.rotary` for the tables and the convention."""
    cos, sin = rotary.cos_sin(array_of(positions, backend.get_array_module(q.data)), q.shape[-1],
                              theta, q.dtype, scaling)
    return apply_rope(q, k, cos, sin)


def apply_rope(q, k, cos, sin):
    """`rope` with the tables cos, sin of its positions given."""
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def repeat_kv(x, n_rep):
    """(B, n_kv, T, hs) -> (B, n_kv·n_rep, T, hs): query head j reads kv head j // n_rep."""
    xp = backend.get_array_module(x.data)
    return x[:, xp.arange(x.shape[1] * n_rep) // n_rep]        # (B, nh, T, hs)


def log1mexp(a):
    """log(1 - e^a) for a log-prob a < 0: the log-probability of *not* drawing the completion.
    (Written plainly it loses digits as a -> 0, where 1 - e^a cancels; the fused one keeps them.)"""
    return (1 - a.exp()).log()                                 # (...)


def logsigmoid_odds_ratio(chosen_logps, rejected_logps):
    """ORPO's log σ(z) with z = log(odds(a_w) / odds(a_l)), odds(a) = e^a / (1 - e^a)."""
    z = (chosen_logps - log1mexp(chosen_logps)) - (rejected_logps - log1mexp(rejected_logps))
    return -(1 + (-z).exp()).log()                             # log σ(z) = -log(1 + e^-z)


def causal_attention(q, k, v, mask=None):
    """softmax(q kᵀ / √hs + causal mask) v for q (..., Tq, hs), k and v (..., Tk, hs).

    The Tq queries are the last Tq of the Tk positions (Tq < Tk with a KV cache), so query i may
    see keys 0 .. Tk - Tq + i. ``mask`` (broadcastable to (..., Tq, Tk), True where a query may
    attend) replaces the causal mask, as in `functional.causal_attention`.
    """
    xp = backend.get_array_module(q.data)
    Tq, Tk, hs = q.shape[-2], k.shape[-2], q.shape[-1]
    if mask is None:
        mask = xp.tril(xp.ones((Tq, Tk), dtype=bool), k=Tk - Tq)   # (Tq, Tk): no future keys
    mask = array_of(mask, xp)
    s = (q @ k.transpose(-2, -1)) / math.sqrt(hs)              # (..., Tq, Tk) scores
    s = where(mask, s, as_tensor(-math.inf, like=s))           # (..., Tq, Tk) -inf where hidden
    return softmax(s, axis=-1) @ v                             # (..., Tq, hs)


def self_attention(qkv, n_head):
    """Multi-head causal self-attention of qkv (B, T, 3C), q, k and v side by side: (B, T, C)."""
    B, T, C3 = qkv.shape
    hs = C3 // 3 // n_head
    heads = qkv.reshape(B, T, 3, n_head, hs).permute(2, 0, 3, 1, 4)   # (3, B, nh, T, hs)
    y = causal_attention(heads[0], heads[1], heads[2])         # (B, nh, T, hs)
    return y.transpose(1, 2).reshape(B, T, C3 // 3)            # (B, T, C): heads side by side


def adamw_step(p, g, m, v, t, lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
    """One AdamW step (Loshchilov & Hutter) of one parameter at step t = 1, 2, ...; arrays in,
    new arrays (p, m, v) out:

        m ← β1·m + (1-β1)·g,  v ← β2·v + (1-β2)·g²,  m̂ = m / (1-β1ᵗ),  v̂ = v / (1-β2ᵗ)
        p ← p - lr·wd·p - lr · m̂ / (√v̂ + eps)
    """
    xp = backend.get_array_module(p)
    beta1, beta2 = betas
    m = beta1 * m + (1 - beta1) * g                            # first moment, like p
    v = beta2 * v + (1 - beta2) * g * g                        # second moment, like p
    m_hat = m / (1 - beta1 ** t)                               # bias-corrected, like p
    v_hat = v / (1 - beta2 ** t)                               # like p
    p = p - lr * weight_decay * p                              # decay, not through the gradient
    p = p - lr * m_hat / (xp.sqrt(v_hat) + eps)                # like p
    return p, m, v
