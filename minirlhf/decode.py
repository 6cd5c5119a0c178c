"""One sampling step of a GPT on raw arrays: the model's own forward for one new token a row with the
KV cache, without Tensors.

`generate` runs the model once per new token. Even under ``no_grad`` each op of that forward makes
a Tensor, checks its inputs and goes through a Module and a Function call: about 2,300 Python calls
a step, a fifth of the small GPT's sampling time. `step` calls the same fused ops' forwards
(`Function.forward`: raw arrays in, raw arrays out) on the same arrays in the same order as
`Transformer.forward` and `GPT.forward`, so its logits are the model's to the last bit (a test
checks it at every switch of `GPTConfig`) and the model's code stays the one to read. It is used
only where it is that same code: a `GPT` built of its own classes, none subclassed or replaced
(`generate` checks), with the fused ops, on the CPU.
"""

import numpy as np

from . import backend, rotary
from . import functional as F
from .nn import RMSNorm


def supports(model):
    """Whether `step` computes what the `GPT` ``model`` computes: the fused ops, eval mode (no
    dropout), NumPy arrays (on a GPU the step's kernels are the same, but it is not measured)."""
    return (model.config.fused and not model.training
            and backend.get_array_module(model.transformer.wte.weight.data) is np)


def step(model, ids, cache):
    """Logits (B, 1, vocab) of the token after ``ids`` (B, 1), the cache holding the positions before
    (its keys and values for the new position are added): `Transformer.forward`, line by line."""
    c, tr = model.config, model.transformer
    pos = cache.positions(1)                                         # (1,) or (B, 1)
    mask = cache.attention_mask(1)
    x = tr.wte.weight.data[ids]                                      # (B, 1, C)
    if c.pos == "learned":
        x = x + tr.wpe.weight.data[pos]
    rope = None
    if c.pos == "rope":
        rope = rotary.cos_sin(pos, c.head_size, c.rope_theta, c.dtype, c.rope_scaling)
    for layer, block in enumerate(tr.h):
        x = x + _attention(block.attn, _norm(block.ln_1, x), cache, layer, mask, rope)
        x = x + _mlp(block.mlp, _norm(block.ln_2, x))
    cache.length += 1
    x = _norm(tr.ln_f, x)
    if c.tie_word_embeddings:
        return F.Linear().forward(x, tr.wte.weight.data.T)           # (B, 1, vocab)
    return _linear(model.lm_head, x)


def _norm(norm, x):
    """`nn.LayerNorm` or `nn.RMSNorm`."""
    if isinstance(norm, RMSNorm):
        return F.RMSNorm(norm.eps).forward(x, norm.weight.data)
    bias = norm.bias.data if norm.bias is not None else np.zeros_like(norm.weight.data)
    return F.LayerNorm(norm.eps).forward(x, norm.weight.data, bias)


def _linear(linear, x):
    """`nn.Linear`."""
    if linear.bias is None:
        return F.Linear().forward(x, linear.weight.data)
    return F.Linear().forward(x, linear.weight.data, linear.bias.data)


def _attention(attn, x, cache, layer, mask, rope):
    """`CausalSelfAttention.forward` with the KV cache (`_attend`)."""
    qkv = _linear(attn.c_attn, x)                                    # (B, 1, C + 2·kv)
    B, T, _ = qkv.shape
    nh, nkv = attn.n_head, attn.n_kv_head
    hs = qkv.shape[-1] // (nh + 2 * nkv)
    if nkv == nh:
        qkv = qkv.reshape(B, T, 3, nh, hs).transpose(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
        q, k, v = qkv[0], qkv[1], qkv[2]
    else:
        q = qkv[:, :, :nh * hs].reshape(B, T, nh, hs).swapaxes(1, 2)
        k = qkv[:, :, nh * hs:(nh + nkv) * hs].reshape(B, T, nkv, hs).swapaxes(1, 2)
        v = qkv[:, :, (nh + nkv) * hs:].reshape(B, T, nkv, hs).swapaxes(1, 2)
    if attn.rope:
        q, k = F.Rope(*rope).forward(q), F.Rope(*rope).forward(k)
    k, v = cache.write(layer, k, v)                                  # (B, nkv, T_so_far, hs)
    if nh != nkv:
        k, v = F.RepeatKV(nh // nkv).forward(k), F.RepeatKV(nh // nkv).forward(v)
    y = F.CausalAttention(mask).forward(q, k, v)                     # (B, nh, T, hs)
    y = y.swapaxes(1, 2).reshape(B, T, nh * hs)
    return _linear(attn.c_proj, y)


def _mlp(mlp, x):
    """`MLP.forward`."""
    if mlp.swiglu:
        h = F.SiLU().forward(_linear(mlp.c_gate, x)) * _linear(mlp.c_fc, x)
    else:
        h = F.GELU().forward(_linear(mlp.c_fc, x))
    return _linear(mlp.c_proj, h)
