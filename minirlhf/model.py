"""GPT-2 (and, with four switches of `GPTConfig`, a Llama), a reward model and a value model on
its trunk, and sampling with a KV cache — in one file, top to bottom.

The architecture is GPT-2's (Radford et al., 2019), written as nanoGPT writes it:

    tokens (B, T) ─ wte + wpe ─┬─ Block ─ ... ─ Block ─ ln_f ─ @ wteᵀ ─ logits (B, T, vocab)
                               │  Block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))

- token and learned position embeddings, pre-LayerNorm blocks (eps 1e-5), a final LayerNorm;
- causal multi-head self-attention with q, k, v from one Linear ``c_attn`` (C, 3C) and an output
  projection ``c_proj``; an MLP ``c_fc`` (C, 4C) → GELU (tanh form) → ``c_proj`` (4C, C);
- the LM head is the token embedding itself (tied): logits = x @ wte.weightᵀ;
- GPT-2's initialisation: N(0, 0.02²) weights and embeddings, zero biases, and the two residual
  projections ``c_proj`` at 0.02/√(2·n_layer), so the residual stream's variance does not grow
  with depth.

Parameter names are GPT-2's (``transformer.wte.weight``, ``transformer.h.0.attn.c_attn.weight``, ...)
and our `Linear` stores W as (in, out) like GPT-2's Conv1D, so a GPT-2 checkpoint maps one to one.
One deviation: attention probabilities get no dropout (the attention is one fused op); residual
and embedding dropout are as in GPT-2.

The Llama family (Llama, SmolLM, Qwen2) changes four places (see `GPTConfig`): RMSNorm for
LayerNorm, rotary embeddings of q and k for ``wpe``, a SwiGLU MLP, and fewer k/v heads than query
heads. Everything else, names included, stays: hf.py maps transformers' names onto these.
"""

import math
import warnings
from dataclasses import dataclass

import numpy as np

from . import backend
from . import decode
from . import functional as F
from . import kernels
from . import ops
from . import rotary
from .nn import Dropout, Embedding, LayerNorm, Linear, Module, ModuleList, RMSNorm, op_module
from .tensor import Tensor, array_of, no_grad


NORMS, POSITIONS, MLPS = ("layer", "rms"), ("learned", "rope"), ("gelu", "swiglu")


@dataclass
class GPTConfig:
    """One config for GPT-2 and the Llama family: a Llama (SmolLM, Qwen2) block is a GPT-2 block
    with four switches turned, so one model class with one config shows exactly where they differ:

    - ``norm="rms"``: RMSNorm (eps ``rms_norm_eps``) instead of LayerNorm;
    - ``pos="rope"``: rotary embeddings of q and k (``rope_theta``, ``rope_scaling``) instead of
      learned position embeddings ``wpe``;
    - ``mlp="swiglu"``: ``c_proj(silu(c_gate(x)) * c_fc(x))`` of width ``n_inner`` instead of
      ``c_proj(gelu(c_fc(x)))``;
    - ``n_kv_head`` < ``n_head``: grouped-query attention, each k/v head shared by a group of heads.

    and three smaller ones: ``tie_word_embeddings=False`` gives an LM head of its own,
    ``bias=False`` drops the biases of every Linear, ``attention_bias=True`` keeps q, k and v's
    (Qwen2). The defaults are GPT-2's, so a GPT-2 config reads as it always did.
    """
    block_size: int = 128      # longest context, in tokens
    vocab_size: int = 258      # 256 bytes + EOT + PAD (minirlhf.tokenizer)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True          # biases in Linear and LayerNorm, as GPT-2
    dtype: str = "float32"     # "float64" for gradient checks
    fused: bool = True         # False: built from the plain ops of reference.py, same numbers
    norm: str = "layer"        # "layer" (GPT-2) or "rms" (Llama)
    pos: str = "learned"       # "learned" (GPT-2's wpe) or "rope" (rotary, Llama)
    mlp: str = "gelu"          # "gelu" (GPT-2) or "swiglu" (Llama)
    n_kv_head: int = None      # key/value heads; None: n_head (no grouping)
    n_inner: int = None        # the MLP's hidden width; None: 4 * n_embd
    rope_theta: float = 10000.0
    rope_scaling: dict = None  # None, or config.json's {"rope_type": "linear"|"llama3", ...}
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True   # the LM head is wte itself (GPT-2, SmolLM) or its own
    attention_bias: bool = False       # q, k, v biases even when bias=False (Qwen2)

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if np.dtype(self.dtype).kind != "f":
            raise ValueError(f"dtype must be a float type, got {self.dtype!r}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.n_inner is None:
            self.n_inner = 4 * self.n_embd
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "n_kv_head", "n_inner"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        for name, allowed in (("norm", NORMS), ("pos", POSITIONS), ("mlp", MLPS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"pos='rope' needs an even head size, got n_embd/n_head="
                             f"{self.n_embd // self.n_head}")
        if self.rope_scaling is not None:
            rotary.inverse_frequencies(2, 1.0, self.rope_scaling)   # refuses an unknown type

    @property
    def head_size(self):
        return self.n_embd // self.n_head


# ===================================================================================================
# the KV cache


class KVCache:
    """Keys and values of every layer for the positions processed so far.

    Decoding one token at a time, attention needs the keys and values of all earlier positions; the
    cache keeps them so each step computes only the new position's. Per layer, ``k[l]`` and ``v[l]``
    are preallocated to (B, n_kv_head, capacity, hs) and the first ``length`` positions are filled;
    ``capacity`` is ``block_size`` unless a shorter ``max_length`` is given (a Llama's block_size
    may be 32k positions that one generation never reaches). With grouped-query attention the
    cache holds the n_kv_head shared heads, before they are repeated for the queries; with rotary
    embeddings the keys are stored rotated.

    ``pad_lengths`` (B,) gives the number of left-padding columns of each row (batched prompts of
    different lengths are left-padded to one length). Padding is then masked out of attention and
    each row's positions start at 0 at its first real token, so a row computes exactly what it
    would alone.

    The cache is for inference (use it under ``no_grad()``): keys and values read back from it carry
    no gradient.
    """

    def __init__(self, config, batch_size, device="cpu", pad_lengths=None, max_length=None):
        capacity = config.block_size if max_length is None else min(max_length, config.block_size)
        shape = (batch_size, config.n_kv_head, capacity, config.head_size)
        xp = backend.get_array_module(backend.to_device(np.zeros(0), device))
        self.xp, self.batch_size, self.block_size = xp, batch_size, capacity
        self.k = [xp.zeros(shape, dtype=config.dtype) for _ in range(config.n_layer)]
        self.v = [xp.zeros(shape, dtype=config.dtype) for _ in range(config.n_layer)]
        self.length = 0
        self.pad = None
        if pad_lengths is not None and np.any(np.asarray(pad_lengths) > 0):
            self.pad = xp.asarray(np.asarray(pad_lengths, dtype=np.int64))   # (B,)

    def positions(self, T):
        """Position ids of the next T columns: (T,), or (B, T) when rows are left-padded."""
        cols = self.length + self.xp.arange(T)
        if self.pad is None:
            return cols
        return self.xp.maximum(cols[None, :] - self.pad[:, None], 0)

    def attention_mask(self, T):
        """(B, 1, T, length+T) True where a query may attend, or None when there is no padding.

        Causal, and a real token never looks at padding (a padding query looks at the padding
        before it, so that its row is not empty; its output is never used).
        """
        if self.pad is None:
            return None
        xp = self.xp
        q_cols = self.length + xp.arange(T)                          # (Tq,)
        k_cols = xp.arange(self.length + T)                          # (Tk,)
        causal = k_cols[None, :] <= q_cols[:, None]                  # (Tq, Tk)
        pad = self.pad[:, None, None]                                # (B, 1, 1)
        into_padding = (k_cols[None, None, :] < pad) & (q_cols[None, :, None] >= pad)
        return (causal[None] & ~into_padding)[:, None]               # (B, 1, Tq, Tk)

    def update(self, layer, k, v):
        """Write the new keys/values (B, n_kv_head, T, hs) after the cached ones; return all of them."""
        k, v = self.write(layer, k.data, v.data)
        return Tensor.from_array(k), Tensor.from_array(v)

    def write(self, layer, k, v):
        """`update` on raw arrays: the cache's views of every key and value so far."""
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


# ===================================================================================================
# the model


class CausalSelfAttention(Module):
    """Causal multi-head attention; q, k, v side by side from one Linear ``c_attn``.

    ``c_attn`` maps C to C + 2·n_kv_head·hs: n_head query heads, then n_kv_head key heads and as
    many value heads (GPT-2: n_kv_head = n_head, so (C, 3C)). With rotary embeddings q and k are
    rotated at their ``positions``; with grouped-query attention each k/v head serves n_head/n_kv_head
    query heads (`repeat_kv`, after the KV cache, which keeps the shared heads only).
    """

    def __init__(self, config, rng, dropout_rng):
        super().__init__()
        C, dt, fused = config.n_embd, config.dtype, config.fused
        self.n_head, self.n_kv_head, self.fn = config.n_head, config.n_kv_head, op_module(fused)
        self.rope = config.pos == "rope"
        kv = 2 * config.n_kv_head * config.head_size
        self.c_attn = Linear(C, C + kv, bias=config.bias or config.attention_bias, rng=rng, dtype=dt,
                             fused=fused)
        self.c_proj = Linear(C, C, bias=config.bias, rng=rng, dtype=dt, fused=fused,
                             init_std=0.02 / math.sqrt(2 * config.n_layer))
        self.resid_dropout = Dropout(config.dropout, rng=dropout_rng)

    def forward(self, x, kv_cache=None, layer=0, mask=None, rope=None):
        """``rope``: the (cos, sin) tables of the positions, with rotary embeddings."""
        qkv = self.c_attn(x)                                         # (B, T, C + 2·kv)
        if (kv_cache is None and mask is None and not self.rope
                and self.n_kv_head == self.n_head):                  # the steps of _attend,
            y = self.fn.self_attention(qkv, self.n_head)             # as one node: (B, T, C)
        else:
            y = self._attend(qkv, kv_cache, layer, mask, rope)       # (B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def _attend(self, qkv, kv_cache, layer, mask, rope):
        """Split q, k, v into heads, rotate q and k, add k and v to the cache, share k and v across
        each group of heads, attend, put the heads side by side."""
        B, T, _ = qkv.shape
        nh, nkv = self.n_head, self.n_kv_head
        hs = qkv.shape[-1] // (nh + 2 * nkv)
        if nkv == nh:
            qkv = qkv.reshape(B, T, 3, nh, hs).permute(2, 0, 3, 1, 4)    # (3, B, nh, T, hs)
            q, k, v = qkv[0], qkv[1], qkv[2]                         # (B, nh, T, hs)
        else:
            q = qkv[:, :, :nh * hs].reshape(B, T, nh, hs).transpose(1, 2)                 # (B, nh, T, hs)
            k = qkv[:, :, nh * hs:(nh + nkv) * hs].reshape(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
            v = qkv[:, :, (nh + nkv) * hs:].reshape(B, T, nkv, hs).transpose(1, 2)         # (B, nkv, T, hs)
        if self.rope:
            q, k = self.fn.apply_rope(q, k, *rope)                   # rotated at their positions
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)                      # (B, nkv, T_so_far, hs)
        k, v = self.fn.repeat_kv(k, nh // nkv), self.fn.repeat_kv(v, nh // nkv)   # (B, nh, ., hs)
        y = self.fn.causal_attention(q, k, v, mask)                  # (B, nh, T, hs)
        return y.transpose(1, 2).reshape(B, T, nh * hs)              # (B, T, C): heads side by side


class MLP(Module):
    """GPT-2's ``c_proj(gelu(c_fc(x)))``, or Llama's SwiGLU ``c_proj(silu(c_gate(x)) * c_fc(x))``
    (transformers' up_proj is our c_fc, gate_proj c_gate, down_proj c_proj)."""

    def __init__(self, config, rng, dropout_rng):
        super().__init__()
        C, H, dt, fused = config.n_embd, config.n_inner, config.dtype, config.fused
        self.fn, self.swiglu = op_module(fused), config.mlp == "swiglu"
        self.c_fc = Linear(C, H, bias=config.bias, rng=rng, dtype=dt, fused=fused)
        if self.swiglu:
            self.c_gate = Linear(C, H, bias=config.bias, rng=rng, dtype=dt, fused=fused)
        self.c_proj = Linear(H, C, bias=config.bias, rng=rng, dtype=dt, fused=fused,
                             init_std=0.02 / math.sqrt(2 * config.n_layer))
        self.dropout = Dropout(config.dropout, rng=dropout_rng)

    def forward(self, x):
        if self.swiglu:
            h = self.fn.silu(self.c_gate(x)) * self.c_fc(x)          # (B, T, H)
        else:
            h = self.fn.gelu(self.c_fc(x))                           # (B, T, H)
        return self.dropout(self.c_proj(h))                          # (B, T, C)


def norm_layer(config):
    """GPT-2's LayerNorm (eps 1e-5) or Llama's RMSNorm (eps ``rms_norm_eps``), as ``config.norm`` says."""
    if config.norm == "rms":
        return RMSNorm(config.n_embd, eps=config.rms_norm_eps, dtype=config.dtype, fused=config.fused)
    return LayerNorm(config.n_embd, eps=1e-5, bias=config.bias, dtype=config.dtype, fused=config.fused)


class Block(Module):
    def __init__(self, config, rng, dropout_rng):
        super().__init__()
        self.ln_1 = norm_layer(config)
        self.attn = CausalSelfAttention(config, rng, dropout_rng)
        self.ln_2 = norm_layer(config)
        self.mlp = MLP(config, rng, dropout_rng)

    def forward(self, x, kv_cache=None, layer=0, mask=None, rope=None):
        x = x + self.attn(self.ln_1(x), kv_cache, layer, mask, rope)   # (B, T, C)
        return x + self.mlp(self.ln_2(x))


class Transformer(Module):
    """The trunk shared by `GPT` and `RewardModel`: token ids (B, T) -> hidden states (B, T, C)."""

    def __init__(self, config, rng, dropout_rng):
        super().__init__()
        dt, fused = config.dtype, config.fused
        self.config = config
        self.wte = Embedding(config.vocab_size, config.n_embd, rng=rng, dtype=dt, fused=fused)
        if config.pos == "learned":
            self.wpe = Embedding(config.block_size, config.n_embd, rng=rng, dtype=dt, fused=fused)
        self.drop = Dropout(config.dropout, rng=dropout_rng)
        self.h = ModuleList([Block(config, rng, dropout_rng) for _ in range(config.n_layer)])
        self.ln_f = norm_layer(config)

    def forward(self, idx, kv_cache=None):
        xp = backend.get_array_module(self.wte.weight.data)
        idx = _as_ids(idx, xp, self.config.vocab_size)               # (B, T)
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        limit = kv_cache.block_size if kv_cache is not None else self.config.block_size
        if start + T > limit:
            where = f" after {start} cached positions" if start else ""
            raise ValueError(f"cannot forward {T} tokens{where}: block_size is "
                             f"{limit} (crop the context to its last tokens)")
        if kv_cache is not None and kv_cache.batch_size != B:
            raise ValueError(f"KV cache made for batch size {kv_cache.batch_size}, got {B} rows")

        pos = kv_cache.positions(T) if kv_cache is not None else xp.arange(T)  # (T,) or (B, T)
        mask = kv_cache.attention_mask(T) if kv_cache is not None else None
        # token ids were checked by _as_ids and position ids are in range: no second check
        x = self.wte(idx, check=False)                               # (B, T, C)
        if self.config.pos == "learned":
            x = x + self.wpe(pos, check=False)                       # + position embeddings
        x = self.drop(x)
        rope = None
        if self.config.pos == "rope":                                # one lookup for every layer
            c = self.config
            rope = rotary.cos_sin(pos, c.head_size, c.rope_theta, c.dtype, c.rope_scaling)
        for layer, block in enumerate(self.h):
            x = block(x, kv_cache, layer, mask, rope)
        if kv_cache is not None:
            kv_cache.length += T
        return self.ln_f(x)                                          # (B, T, C)


def _as_ids(idx, xp, vocab_size):
    """Token ids as an integer (B, T) array of the model's library, checked against the vocabulary."""
    ids = array_of(idx)
    if not hasattr(ids, "dtype"):
        ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"token ids must be integers, got dtype {ids.dtype}")
    if ids.ndim != 2:
        raise ValueError(f"token ids must have shape (B, T), got {tuple(ids.shape)}")
    F.check_ids(ids, vocab_size, "token id")
    return xp.asarray(ids)


class TransformerModel(Module):
    """What GPT, RewardModel and ValueModel share: a `GPTConfig`, weights drawn from ``seed`` (an int,
    None or a ``numpy.random.Generator``) and one generator, ``dropout_rng``, for every Dropout's masks.

    Assigning ``model.dropout_rng`` (say, a generator restored from a checkpoint) hands it to all of
    the model's Dropout layers, so a resumed run drops exactly what the uninterrupted run would.
    """

    def __init__(self, config, seed):
        super().__init__()
        self.config = config
        self.init_rng = seed if isinstance(seed, np.random.Generator) else backend.host_rng(seed)
        self.dropout_rng = backend.host_rng(int(self.init_rng.integers(2**63)))

    @property
    def dropout_rng(self):
        return self._dropout_rng

    @dropout_rng.setter
    def dropout_rng(self, rng):
        self._dropout_rng = rng
        for m in self.modules():
            if isinstance(m, Dropout):
                m.rng = rng


class GPT(TransformerModel):
    """GPT-2: ``model(idx)`` maps token ids (B, T) to next-token logits (B, T, vocab_size).

    ``seed`` fixes the initial weights on every device; see `TransformerModel` for ``dropout_rng``.
    """

    def __init__(self, config, seed=0):
        super().__init__(config, seed)
        self.transformer = Transformer(config, self.init_rng, self.dropout_rng)
        self.fn = op_module(config.fused)
        if not config.tie_word_embeddings:                           # a head of its own (Qwen2, Llama)
            self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False, rng=self.init_rng,
                                  dtype=config.dtype, fused=config.fused)

    def forward(self, idx, kv_cache=None):
        """Logits (B, T, vocab). With ``kv_cache``, ``idx`` holds only the new tokens: they are
        placed after the cached positions and their keys/values are appended to the cache."""
        x = self.transformer(idx, kv_cache)                          # (B, T, C)
        if self.config.tie_word_embeddings:
            return self.fn.linear(x, self.transformer.wte.weight.T)  # (B, T, vocab): tied head
        return self.lm_head(x)                                       # (B, T, vocab)

    def hidden_states(self, idx, kv_cache=None):
        """The final hidden states (B, T, C), after ``ln_f`` and before the LM head."""
        return self.transformer(idx, kv_cache)

    @property
    def lm_head_weight(self):
        """The LM head's weight (vocab, C): the token embedding itself (tied, not a copy), or the
        head's own weight seen as (vocab, C)."""
        if self.config.tie_word_embeddings:
            return self.transformer.wte.weight
        return self.lm_head.weight.T

    def new_kv_cache(self, batch_size, pad_lengths=None, max_length=None):
        return KVCache(self.config, batch_size, self.device, pad_lengths, max_length)


class ScalarHeadModel(TransformerModel):
    """The GPT trunk and a scalar head, a Linear from C to 1: what RewardModel and ValueModel share
    (the same weights and names). They differ only in where they read the head."""

    def __init__(self, config, seed=0):
        super().__init__(config, seed)
        self.transformer = Transformer(config, self.init_rng, self.dropout_rng)
        self.head = Linear(config.n_embd, 1, bias=True, rng=self.init_rng, dtype=config.dtype,
                           fused=config.fused)

    def load_trunk(self, state_dict):
        """Copy the ``transformer.*`` weights of a GPT state dict; the head stays as it is."""
        trunk = {k: v for k, v in state_dict.items() if k.startswith("transformer.")}
        own = {k for k, _ in self.named_parameters() if k.startswith("transformer.")}
        missing = sorted(own - set(trunk))
        if missing:
            raise ValueError("load_trunk: the state dict lacks trunk weights: " + ", ".join(missing))
        self.load_state_dict(trunk, strict=False)
        return self

    @classmethod
    def from_gpt(cls, gpt, seed=0):
        """A model whose trunk is a copy of ``gpt``'s (on its device) and whose head is new."""
        model = cls(gpt.config, seed=seed).to(gpt.device)
        return model.load_trunk(gpt.state_dict())


class RewardModel(ScalarHeadModel):
    """r(x, y): the GPT trunk and a scalar head read at the last non-padding token.

    ``rm(input_ids, lengths)``: input_ids (B, T) right-padded, lengths (B,) the number of real
    tokens of each row -> rewards (B,). Attention is causal, so the hidden state at position
    ``length-1`` has seen the whole sequence and nothing of the padding after it.
    """

    def forward(self, input_ids, lengths):
        xp = backend.get_array_module(self.head.weight.data)
        h = self.transformer(input_ids)                              # (B, T, C)
        B, T, C = h.shape
        lengths = backend.to_numpy(array_of(lengths))
        if lengths.shape != (B,) or lengths.dtype.kind not in "iu":
            raise ValueError(f"lengths must be {B} integers, got {lengths.dtype} {lengths.shape}")
        if B and (lengths.min() < 1 or lengths.max() > T):
            raise ValueError(f"lengths must lie in [1, {T}], got {lengths.tolist()}")
        last = h[xp.arange(B), xp.asarray(lengths - 1)]              # (B, C)
        return self.head(last).reshape(B)                            # (B,)


class ValueModel(ScalarHeadModel):
    """V(x, y_<t): the GPT trunk and a scalar head read at every position (PPO's critic).

    ``vm(input_ids)``: input_ids (B, T) -> values (B, T), aligned like `minirlhf.logprobs`:
    ``values[:, t]`` is read from the hidden state at t-1, the state *before* token t was sampled,
    so it sits under the token it values; ``values[:, 0]`` is 0 (nothing comes before token 0).
    Its weights have the names of a `RewardModel`'s, so InstructGPT's start, a value model that is
    a copy of the reward model, is ``ValueModel.from_reward_model(rm)``.
    """

    def forward(self, input_ids):
        h = self.transformer(input_ids)                              # (B, T, C)
        B, T, C = h.shape
        v = self.head(h[:, :-1]).reshape(B, T - 1)                   # (B, T-1): V of token t from t-1
        xp = backend.get_array_module(v.data)
        first = Tensor.from_array(xp.zeros((B, 1), dtype=v.dtype))
        return ops.concatenate([first, v], axis=1)                   # (B, T)

    @classmethod
    def from_reward_model(cls, rm, seed=0):
        """A value model that is a copy of the reward model, trunk and head (as InstructGPT began)."""
        vm = cls(rm.config, seed=seed).to(rm.device)
        vm.load_state_dict(rm.state_dict())
        return vm


# ===================================================================================================
# sampling


@dataclass
class Generation:
    """What `generate` returns, one entry per prompt, in the order given."""
    tokens: list        # the new token ids (ending with EOT if the row stopped there)
    logprobs: list      # log p_θ(y_t | prompt, y_<t) of each new token, untempered and unfiltered
    sequences: list     # the prompt as given (even if cropped for the model) + new tokens


_GPT_MODULES = (GPT, Transformer, Block, CausalSelfAttention, MLP, Linear, LayerNorm, RMSNorm,
                Embedding, Dropout, ModuleList)


def generate(model, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
             eot_id=None, seed=None, use_cache=True):
    """Sample continuations of a batch of prompts of different lengths.

    ``prompts``: a list of token-id lists. ``temperature`` 0 is greedy decoding; ``top_k`` keeps the
    k most likely tokens, ``top_p`` the smallest set of tokens whose probability reaches p (nucleus);
    both act on the tempered distribution. A row that samples ``eot_id`` stops (EOT is kept as its
    last token); the others go on. ``seed``: an int, None, or a ``numpy.random.Generator``; sampling
    draws on the host, so one seed gives the same tokens on CPU and GPU.

    How a batch is run: prompts are left-padded to one length; the padding is masked out of
    attention and each row's positions count from its first real token (`KVCache`), so every row
    computes what it would alone. Prompts longer than ``block_size`` keep their last ``block_size``
    tokens (with a warning). With ``use_cache`` the prompt is run once and each new token is one
    step; once the context reaches ``block_size`` the cache cannot grow, and each step re-runs the
    model on the last ``block_size`` tokens (cropping, as nanoGPT does). ``use_cache=False`` re-runs
    the whole (cropped) context every step.

    The log-probs are those RL needs: log p_θ of the sampled token under the model's own
    distribution, before temperature and filtering.
    """
    cfg = model.config
    prompts = _check_generate_args(prompts, max_new_tokens, temperature, top_k, top_p, cfg)
    rng = seed if isinstance(seed, np.random.Generator) else backend.host_rng(seed)

    too_long = sum(len(p) > cfg.block_size for p in prompts)
    if too_long:
        warnings.warn(f"generate: {too_long} prompt(s) longer than block_size={cfg.block_size}; "
                      "keeping their last block_size tokens", stacklevel=2)
    context = [p[-cfg.block_size:] for p in prompts]
    B, L = len(context), max(len(p) for p in context)
    pad = np.array([L - len(p) for p in context])                    # left padding of each row
    rows = np.zeros((B, L + max_new_tokens), dtype=np.int64)         # all tokens, left-padded
    for b, p in enumerate(context):
        rows[b, pad[b]:L] = p

    new_tokens, new_logprobs = [[] for _ in range(B)], [[] for _ in range(B)]
    done = np.zeros(B, dtype=bool)
    was_training = model.training
    model.eval()
    # the same step on raw arrays (decode.py), where it is the same code: every module one of
    # GPT's own classes as they are (a user's subclass or replaced layer runs its own forward)
    fast = all(type(m) in _GPT_MODULES for m in model.modules()) and decode.supports(model)
    try:
        with no_grad():
            cache, T = None, L                                       # T: columns filled so far
            for _ in range(max_new_tokens):
                if use_cache and cache is not None and cache.length < cache.block_size:
                    new = rows[:, T - 1:T]                           # (B, 1): one new column
                    logits = (decode.step(model, new, cache) if fast
                              else model(new, kv_cache=cache).data)  # (B, 1, V)
                else:                                                 # (re)run the last block_size columns
                    start = max(T - cfg.block_size, 0)
                    cache = model.new_kv_cache(B, np.maximum(pad - start, 0),
                                               max_length=rows.shape[1] - start)
                    logits = model(rows[:, start:T], kv_cache=cache).data   # (B, T - start, V)
                last = backend.to_numpy(logits[:, -1, :]).astype(np.float64)   # (B, V)
                if not np.isfinite(last).all():
                    raise FloatingPointError("generate: the model produced non-finite logits "
                                             "(has training diverged?)")
                logp = kernels.log_softmax(last, axis=-1)
                tok = _sample(last, temperature, top_k, top_p, rng)  # (B,)
                for b in np.flatnonzero(~done):
                    new_tokens[b].append(int(tok[b]))
                    new_logprobs[b].append(float(logp[b, tok[b]]))
                    done[b] = eot_id is not None and tok[b] == eot_id
                rows[:, T] = tok
                T += 1
                if done.all():
                    break
    finally:
        model.train(was_training)
    return Generation(tokens=new_tokens, logprobs=new_logprobs,
                      sequences=[list(p) + t for p, t in zip(prompts, new_tokens)])


def _check_generate_args(prompts, max_new_tokens, temperature, top_k, top_p, cfg):
    if isinstance(prompts, np.ndarray):
        prompts = prompts.tolist()
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("generate: prompts must be a non-empty list of token-id lists")
    prompts = [list(map(int, p)) for p in prompts]
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"generate: prompt {i} is empty (start it with a token, e.g. EOT)")
        if min(p) < 0 or max(p) >= cfg.vocab_size:
            raise ValueError(f"generate: prompt {i} has token ids outside [0, {cfg.vocab_size})")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"generate: temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (int(top_k) != top_k or top_k < 1):
        raise ValueError(f"generate: top_k must be an integer >= 1 or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"generate: top_p must lie in (0, 1] or be None, got {top_p}")
    return prompts


def _sample(logits, temperature, top_k, top_p, rng):
    """One token per row of host logits (B, V): greedy, or sampled after temperature/top-k/top-p."""
    if temperature == 0:
        return logits.argmax(axis=-1)
    z = logits / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = np.sort(z, axis=-1)[:, -int(top_k)][:, None]           # k-th largest of each row
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    if top_p is not None and top_p < 1:
        order = np.argsort(-p, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(p, order, axis=-1)
        # keep a token while the probability of the more likely ones is still below top_p
        drop_sorted = np.cumsum(sorted_p, axis=-1) - sorted_p >= top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        p = np.where(drop, 0.0, p)
        p /= p.sum(axis=-1, keepdims=True)
    # inverse CDF: the first token whose cumulative probability exceeds u ~ U[0, 1)
    cdf = np.cumsum(p, axis=-1)
    u = rng.random(len(p))[:, None] * cdf[:, -1:]
    return np.minimum((cdf <= u).sum(axis=-1), p.shape[-1] - 1)
