"""The cos/sin tables of rotary position embeddings (RoPE, Su et al. 2021), as Llama uses them.

RoPE encodes position ``m`` by rotating each pair of coordinates of a query or key by the angle
``m·θ_i``, with one frequency per pair, ``θ_i = theta^(-2i/hs)`` for i = 0 .. hs/2 - 1. A rotation
preserves dot products up to the angle between positions, so ``q_m · k_n`` depends on m - n only.

Which coordinates form a pair: the paper pairs neighbours (x_0, x_1), (x_2, x_3), ... ("interleaved");
transformers' Llama pairs the two halves (x_i, x_{i + hs/2}) ("rotate half"):

    rope(x) = x · cos + rotate_half(x) · sin,   rotate_half(x) = (-x_{hs/2:}, x_{:hs/2})

with cos and sin of the angles repeated twice along the head, (m·θ_0 .. m·θ_{hs/2-1}) side by side
with itself. Both are the same rotation of the same pairs once the coordinates are permuted:
the permutation sending 2i -> i and 2i+1 -> i + hs/2 maps interleaved pairs onto half pairs, and
since q and k are permuted alike (it is a fixed reordering of the columns of the q and k
projections) every score q·k is unchanged. minirlhf uses the rotate-half form so that Llama and
Qwen2 checkpoints load without permuting their weights.

The tables depend only on (head size, theta, scaling), so they are computed once, in float64, for
as many positions as asked so far, and kept (`cos_sin`); a model's dtype gets a cast copy.
"""

import json
import math

import numpy as np

from . import backend

ROPE_SCALINGS = ("linear", "llama3")          # rope_scaling types of config.json computed here


def inverse_frequencies(head_size, theta, scaling=None):
    """θ_i = theta^(-2i/hs), i = 0 .. hs/2 - 1, float64; with Llama 3's or linear rope scaling.

    ``scaling``: None, {"rope_type": "linear", "factor": f} (every frequency divided by f), or
    Llama 3.1's {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}: wavelengths longer than original/low are divided by
    factor, shorter than original/high kept, and those between interpolated smoothly.
    """
    inv = 1.0 / theta ** (np.arange(0, head_size, 2, dtype=np.float64) / head_size)   # (hs/2,)
    kind = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv / factor
    if kind != "llama3":
        raise ValueError(f"rope_scaling type {kind!r} is not supported (only {', '.join(ROPE_SCALINGS)})")
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old = float(scaling["original_max_position_embeddings"])
    wavelength = 2 * math.pi / inv
    scaled = np.where(wavelength > old / low, inv / factor, inv)
    smooth = (old / wavelength - low) / (high - low)                # 0 at old/low, 1 at old/high
    between = (wavelength >= old / high) & (wavelength <= old / low)
    return np.where(between, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


_TABLES = {}   # (head_size, theta, scaling) -> (cos, sin), float64 (P, hs) on the host


def _host_tables(head_size, theta, scaling, n_positions):
    key = (head_size, float(theta), json.dumps(scaling, sort_keys=True))
    cos, sin = _TABLES.get(key, (np.zeros((0, head_size)), None))
    if cos.shape[0] < n_positions:
        n = max(n_positions, 2 * cos.shape[0])                      # grow by doubling
        angles = np.arange(n, dtype=np.float64)[:, None] * inverse_frequencies(head_size, theta, scaling)
        angles = np.concatenate([angles, angles], axis=-1)          # (n, hs): both halves alike
        cos, sin = np.cos(angles), np.sin(angles)
        _TABLES[key] = cos, sin
    return _TABLES[key]


def cos_sin(positions, head_size, theta, dtype, scaling=None):
    """cos and sin of the angles at integer ``positions`` (T,) or (B, T): each (T, hs), or
    (B, 1, T, hs) to broadcast over the heads of (B, nh, T, hs), in ``dtype`` on the positions'
    device."""
    if head_size % 2:
        raise ValueError(f"rope: the head size must be even, got {head_size}")
    device = backend.device_of(positions)
    pos = backend.to_numpy(positions)
    if pos.dtype.kind not in "iu" or (pos.size and pos.min() < 0):
        raise ValueError("rope: positions must be integers >= 0")
    cos, sin = _host_tables(head_size, theta, scaling, int(pos.max()) + 1 if pos.size else 1)
    cos, sin = cos[pos].astype(dtype), sin[pos].astype(dtype)       # (..., T, hs)
    if pos.ndim == 2:
        cos, sin = cos[:, None], sin[:, None]                       # (B, 1, T, hs)
    return backend.to_device(cos, device), backend.to_device(sin, device)
