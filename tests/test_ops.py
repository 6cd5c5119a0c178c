"""One table-driven harness for every differentiable op, primitive and fused.

Each row of `CASES` names an op, writes it on minirlhf Tensors and again in plain NumPy, and gives the
hypothesis strategy that draws its inputs: ``(arrays, params)``, the float arrays to differentiate and
the op's fixed arguments (axis, index, targets, ...). Kinks are kept out of the inputs by the strategy
(``away_from=[0.0]`` for relu). One test runs every row: the forward must match NumPy in float64,
and `mr.gradcheck` must accept the backward. Shapes include 0-d arrays, size-1 axes and broadcasting.
The conventions at the kinks, which sampling avoids, are pinned by the exact tests at the end.

With MINIRLHF_TEST_DEVICE=cuda the same rows run on CuPy.
"""

import math
from typing import Callable, NamedTuple

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import minirlhf as mr
import minirlhf.functional as F
import minirlhf.testing as mrt
from minirlhf import backend


class Case(NamedTuple):
    name: str
    op: Callable          # the op on Tensors: op(*tensors, **params)
    ref: Callable         # the same in NumPy: ref(*arrays, **params)
    inputs: st.SearchStrategy  # draws (arrays, params); kinks to avoid are given to it


# ===================================================================================================
# input strategies


def no_params(*array_strategies):
    """Inputs for an op without fixed arguments."""
    return st.tuples(st.tuples(*array_strategies), st.just({}))


def unary(**array_kwargs):
    return no_params(mrt.arrays(**array_kwargs))


def binary(**array_kwargs):
    return st.tuples(mrt.broadcastable_arrays(2, **array_kwargs), st.just({}))


def axes(ndim):
    """None, one axis (maybe negative), or a tuple of distinct axes: what reductions accept."""
    if ndim == 0:
        return st.none()
    return st.one_of(st.none(), st.integers(-ndim, ndim - 1),
                     st.lists(st.integers(0, ndim - 1), unique=True, max_size=ndim).map(tuple))


@st.composite
def reduction(draw, array_strategy):
    x = draw(array_strategy)
    return (x,), {"axis": draw(axes(x.ndim)), "keepdims": draw(st.booleans())}


@st.composite
def pow_scalar(draw):
    x = draw(mrt.arrays(min_value=0.5, max_value=2.0))
    return (x,), {"p": draw(st.sampled_from([2, 3, 0.5, -1.5, 1.0]))}


@st.composite
def matmul_pair(draw, shapes_of):
    """Two matrices whose shapes come from ``shapes_of(b, n, k, m)``, sizes from 1 to 4."""
    b, n, k, m = (draw(st.integers(1, 4)) for _ in range(4))
    shape_a, shape_b = shapes_of(b, n, k, m)
    return (draw(mrt.arrays(shape_a)), draw(mrt.arrays(shape_b))), {}


@st.composite
def reshape_inputs(draw):
    x = draw(mrt.arrays())
    candidates = [(x.size,), (-1,), x.shape[::-1], (1,) + x.shape + (1,)]
    if x.ndim >= 1:
        candidates.append((x.shape[0], -1))
    if x.size == 1:
        candidates.append(())
    return (x,), {"shape": draw(st.sampled_from(candidates))}


@st.composite
def transpose_inputs(draw):
    x = draw(mrt.arrays(mrt.shapes(min_dims=1)))
    dim = st.integers(-x.ndim, x.ndim - 1)
    return (x,), {"dim0": draw(dim), "dim1": draw(dim)}


@st.composite
def permute_inputs(draw):
    x = draw(mrt.arrays())
    return (x,), {"dims": tuple(draw(st.permutations(range(x.ndim))))}


@st.composite
def basic_index_inputs(draw):
    x = draw(mrt.arrays(mrt.shapes(min_dims=1)))
    return (x,), {"index": draw(hnp.basic_indices(x.shape, allow_newaxis=True))}


@st.composite
def reversed_slice_inputs(draw):
    x = draw(mrt.arrays(mrt.shapes(min_dims=1)))
    index = tuple(slice(None, None, -draw(st.integers(1, 2))) for _ in range(x.ndim))
    return (x,), {"index": index}


@st.composite
def gather_inputs(draw):
    """x[idx] with an integer array that holds at least one repeated (and maybe negative) row."""
    x = draw(mrt.arrays(mrt.shapes(min_dims=1)))
    n = x.shape[0]
    idx = draw(st.lists(st.integers(-n, n - 1), min_size=1, max_size=5))
    return (x,), {"index": np.array(idx + idx[:1])}


@st.composite
def mixed_index_inputs(draw):
    """x[::-1, idx] with a 2-d integer array along the second axis."""
    x = draw(mrt.arrays(mrt.shapes(min_dims=2)))
    idx = draw(hnp.arrays(np.int64, (2, 3), elements=st.integers(0, x.shape[1] - 1)))
    return (x,), {"index": (slice(None, None, -1), idx)}


@st.composite
def paired_index_inputs(draw):
    """x[i, j] with two integer arrays that broadcast against each other."""
    x = draw(mrt.arrays(mrt.shapes(min_dims=2)))
    i = draw(hnp.arrays(np.int64, (3, 1), elements=st.integers(0, x.shape[0] - 1)))
    j = draw(hnp.arrays(np.int64, (2,), elements=st.integers(0, x.shape[1] - 1)))
    return (x,), {"index": (i, j)}


@st.composite
def clip_inputs(draw):
    """Bounds lo in [-2, 0] and hi in [0.5, 2], one of them maybe absent; x kept away from both."""
    lo, hi = draw(st.floats(-2.0, 0.0)), draw(st.floats(0.5, 2.0))
    which = draw(st.sampled_from(["both", "min only", "max only"]))
    lo = None if which == "max only" else lo
    hi = None if which == "min only" else hi
    kinks = [b for b in (lo, hi) if b is not None]
    return (draw(mrt.arrays(away_from=kinks)),), {"lo": lo, "hi": hi}


@st.composite
def where_inputs(draw):
    shape_c, shape_a, shape_b = draw(mrt.broadcastable_shapes(3))
    cond = draw(hnp.arrays(np.bool_, shape_c))
    return (draw(mrt.arrays(shape_a)), draw(mrt.arrays(shape_b))), {"cond": cond}


@st.composite
def masked_fill_inputs(draw):
    x = draw(mrt.arrays())
    mask = draw(hnp.arrays(np.bool_, hnp.broadcastable_shapes(x.shape, max_dims=x.ndim)))
    return (x,), {"mask": mask, "value": draw(st.sampled_from([0.0, -1e4, 2.5]))}


@st.composite
def concatenate_inputs(draw):
    shape = draw(mrt.shapes(min_dims=1))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    a = axis % len(shape)
    sizes = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    xs = tuple(draw(mrt.arrays(shape[:a] + (s,) + shape[a + 1:])) for s in sizes)
    return xs, {"axis": axis}


@st.composite
def stack_inputs(draw):
    shape = draw(mrt.shapes())
    n = draw(st.integers(1, 3))
    xs = tuple(draw(mrt.arrays(shape)) for _ in range(n))
    return xs, {"axis": draw(st.integers(-len(shape) - 1, len(shape)))}


@st.composite
def along_axis(draw):
    x = draw(mrt.arrays(mrt.shapes(min_dims=1), min_value=-5.0, max_value=5.0))
    return (x,), {"axis": draw(st.integers(-x.ndim, x.ndim - 1))}


@st.composite
def cross_entropy_inputs(draw):
    z = draw(mrt.logits())
    ignore_index = draw(st.sampled_from([-100, 0]))
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    t = draw(mrt.int_targets(z.shape[:-1], z.shape[-1], ignore_index=ignore_index)).copy()
    if reduction == "mean" and (t == ignore_index).all():
        t.flat[0] = 1 if ignore_index == 0 else 0  # the mean of no rows is nan: tested on its own
    return (z,), {"targets": t, "ignore_index": ignore_index, "reduction": reduction}


@st.composite
def layer_norm_inputs(draw):
    x = draw(mrt.arrays(mrt.shapes(min_dims=1)))
    C = x.shape[-1]
    return (x, draw(mrt.arrays((C,))), draw(mrt.arrays((C,)))), {}


@st.composite
def embedding_inputs(draw):
    V, C = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    ids_shape = draw(mrt.shapes(max_dims=2, min_side=0))
    return (draw(mrt.arrays((V, C))),), {"ids": draw(mrt.int_targets(ids_shape, V))}


@st.composite
def attention_inputs(draw, kv_cache):
    """q (B, nh, Tq, hs), k and v (B, nh, Tk, hs): Tq == Tk, or Tq < Tk as with a KV cache."""
    B, nh, hs = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 4))
    Tk = draw(st.integers(2 if kv_cache else 1, 4))
    Tq = draw(st.integers(1, Tk - 1)) if kv_cache else Tk
    q = draw(mrt.arrays((B, nh, Tq, hs), min_value=-2.0, max_value=2.0))
    k, v = (draw(mrt.arrays((B, nh, Tk, hs), min_value=-2.0, max_value=2.0)) for _ in range(2))
    return (q, k, v), {}


@st.composite
def rms_norm_inputs(draw):
    x = draw(mrt.arrays(mrt.shapes(min_dims=1), min_value=0.3, max_value=2.0))   # no all-0 row
    return (x, draw(mrt.arrays((x.shape[-1],)))), {}


@st.composite
def rope_inputs(draw):
    """q, k (B, nh, T, hs) with hs even; positions (T,) or, as with left padding, (B, T)."""
    B, nh, T, hs = (draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 4)),
                    2 * draw(st.integers(1, 3)))
    q, k = (draw(mrt.arrays((B, nh, T, hs))) for _ in range(2))
    shape = draw(st.sampled_from([(T,), (B, T)]))
    positions = np.asarray(draw(st.lists(st.integers(0, 50), min_size=int(np.prod(shape)),
                                         max_size=int(np.prod(shape))))).reshape(shape)
    return (q, k), {"positions": positions, "theta": draw(st.sampled_from([10000.0, 1e6]))}


@st.composite
def repeat_kv_inputs(draw):
    B, n_kv, T, hs = (draw(st.integers(1, 2)) for _ in range(4))
    return (draw(mrt.arrays((B, n_kv, T, hs))),), {"n_rep": draw(st.integers(1, 3))}


# ===================================================================================================
# NumPy references, written plainly


def np_sigmoid(x):
    return 1 / (1 + np.exp(-x))


def np_softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_log_softmax(x, axis):
    return np.log(np_softmax(x, axis))


def np_cross_entropy(z, targets, ignore_index, reduction):
    logp = np_log_softmax(z, axis=-1)                                         # (..., V)
    valid = targets != ignore_index
    picked = np.take_along_axis(logp, np.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    nll = np.where(valid, -picked, 0.0)                                       # (...)
    if reduction == "none":
        return nll
    return nll.sum() if reduction == "sum" else nll.sum() / valid.sum()


def np_layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def np_gelu(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def np_rms_norm(x, w, eps=1e-6):
    return x / np.sqrt((x ** 2).mean(axis=-1, keepdims=True) + eps) * w


def np_silu(x):
    return x / (1 + np.exp(-x))


def np_rope(q, k, positions, theta):
    """The paper's rotation of pairs (x_i, x_{i + hs/2}) by the angle m·theta^(-2i/hs), pair by pair."""
    hs = q.shape[-1]
    m = np.asarray(positions, dtype=np.float64)                # (T,), or (B, T) -> (B, 1, T)
    m = m[:, None, :] if m.ndim == 2 else m
    out = []
    for x in (q, k):
        y = np.empty_like(x)
        for i in range(hs // 2):
            angle = m * theta ** (-2 * i / hs)
            a, b = x[..., i], x[..., i + hs // 2]
            y[..., i] = a * np.cos(angle) - b * np.sin(angle)
            y[..., i + hs // 2] = a * np.sin(angle) + b * np.cos(angle)
        out.append(y)
    return np.stack(out)


def np_repeat_kv(x, n_rep):
    return np.repeat(x, n_rep, axis=1)


def np_logsigmoid_odds_ratio(a_w, a_l):
    """log σ of ORPO's log odds ratio, odds(a) = e^a / (1 - e^a)."""
    z = (a_w - np.log(-np.expm1(a_w))) - (a_l - np.log(-np.expm1(a_l)))
    return -np.logaddexp(0, -z)


def np_causal_attention(q, k, v):
    """Query i (of Tq, the last Tq of Tk positions) attends to keys 0 .. Tk - Tq + i."""
    Tq, Tk, hs = q.shape[-2], k.shape[-2], q.shape[-1]
    out = np.zeros(q.shape)
    for i in range(Tq):
        seen = Tk - Tq + i + 1
        scores = q[..., i:i + 1, :] @ np.swapaxes(k[..., :seen, :], -1, -2) / np.sqrt(hs)  # (B, nh, 1, seen)
        out[..., i:i + 1, :] = np_softmax(scores, axis=-1) @ v[..., :seen, :]
    return out


# ===================================================================================================
# the table

CASES = [
    # elementwise arithmetic, with broadcasting
    Case("add", lambda a, b: a + b, np.add, binary()),
    Case("sub", lambda a, b: a - b, np.subtract, binary()),
    Case("mul", lambda a, b: a * b, np.multiply, binary()),
    Case("div", lambda a, b: a / b, np.divide, binary(away_from=[0.0], margin=0.3)),
    Case("pow_scalar", lambda x, p: x ** p, lambda x, p: x ** p, pow_scalar()),
    Case("pow_tensor", lambda a, b: a ** b, np.power, binary(min_value=0.5, max_value=2.0)),
    Case("rpow", lambda x: 2.0 ** x, lambda x: 2.0 ** x, unary()),
    Case("rsub_rdiv", lambda x: (1.0 - x) / 3.0 + 2.0 / x, lambda x: (1.0 - x) / 3.0 + 2.0 / x,
         unary(away_from=[0.0], margin=0.3)),
    Case("neg", lambda x: -x, np.negative, unary()),
    # matrix products
    Case("matmul_2d", lambda a, b: a @ b, np.matmul,
         matmul_pair(lambda b, n, k, m: ((n, k), (k, m)))),
    Case("matmul_batched", lambda a, b: a @ b, np.matmul,
         matmul_pair(lambda b, n, k, m: ((b, n, k), (b, k, m)))),
    Case("matmul_broadcast_batch", lambda a, b: a @ b, np.matmul,
         matmul_pair(lambda b, n, k, m: ((2, 1, n, k), (b, k, m)))),
    Case("matmul_btc_cd", lambda a, b: a @ b, np.matmul,
         matmul_pair(lambda b, n, k, m: ((b, n, k), (k, m)))),
    Case("matmul_4d_2d", lambda a, b: a @ b, np.matmul,
         matmul_pair(lambda b, n, k, m: ((2, b, n, k), (k, m)))),
    Case("matmul_vec_vec", mr.matmul, np.matmul, matmul_pair(lambda b, n, k, m: ((k,), (k,)))),
    Case("matmul_vec_mat", mr.matmul, np.matmul, matmul_pair(lambda b, n, k, m: ((k,), (b, k, m)))),
    Case("matmul_mat_vec", mr.matmul, np.matmul, matmul_pair(lambda b, n, k, m: ((b, n, k), (k,)))),
    # reductions
    Case("sum", lambda x, axis, keepdims: x.sum(axis, keepdims),
         lambda x, axis, keepdims: x.sum(axis, keepdims=keepdims), reduction(mrt.arrays())),
    Case("mean", lambda x, axis, keepdims: x.mean(axis, keepdims),
         lambda x, axis, keepdims: x.mean(axis, keepdims=keepdims), reduction(mrt.arrays())),
    Case("max", lambda x, axis, keepdims: x.max(axis, keepdims),
         lambda x, axis, keepdims: x.max(axis, keepdims=keepdims),
         reduction(mrt.unique_max_arrays())),
    # movement
    Case("reshape", lambda x, shape: x.reshape(shape), lambda x, shape: x.reshape(shape),
         reshape_inputs()),
    Case("transpose", lambda x, dim0, dim1: x.transpose(dim0, dim1),
         lambda x, dim0, dim1: np.swapaxes(x, dim0, dim1), transpose_inputs()),
    Case("permute", lambda x, dims: x.permute(*dims), lambda x, dims: np.transpose(x, dims),
         permute_inputs()),
    Case("T", lambda x: x.T, lambda x: x.T, unary()),
    Case("getitem_basic", lambda x, index: x[index], lambda x, index: x[index], basic_index_inputs()),
    Case("getitem_negative_step", lambda x, index: x[index], lambda x, index: x[index],
         reversed_slice_inputs()),
    Case("getitem_int_array", lambda x, index: x[index], lambda x, index: x[index], gather_inputs()),
    Case("getitem_mixed", lambda x, index: x[index], lambda x, index: x[index], mixed_index_inputs()),
    Case("getitem_paired", lambda x, index: x[index], lambda x, index: x[index],
         paired_index_inputs()),
    Case("concatenate", lambda *xs, axis: mr.concatenate(xs, axis),
         lambda *xs, axis: np.concatenate(xs, axis), concatenate_inputs()),
    Case("stack", lambda *xs, axis: mr.stack(xs, axis), lambda *xs, axis: np.stack(xs, axis),
         stack_inputs()),
    # elementwise functions
    Case("exp", lambda x: x.exp(), np.exp, unary()),
    Case("log", lambda x: x.log(), np.log, unary(min_value=0.1)),
    Case("sqrt", lambda x: x.sqrt(), np.sqrt, unary(min_value=0.1)),
    Case("tanh", lambda x: x.tanh(), np.tanh, unary()),
    Case("sigmoid", lambda x: x.sigmoid(), np_sigmoid, unary(min_value=-8.0, max_value=8.0)),
    Case("relu", lambda x: x.relu(), lambda x: np.maximum(x, 0), unary(away_from=[0.0])),
    Case("clip", lambda x, lo, hi: x.clip(lo, hi), lambda x, lo, hi: np.clip(x, lo, hi), clip_inputs()),
    # selection
    Case("where", lambda a, b, cond: mr.where(cond, a, b), lambda a, b, cond: np.where(cond, a, b),
         where_inputs()),
    Case("masked_fill", lambda x, mask, value: x.masked_fill(mask, value),
         lambda x, mask, value: np.where(mask, value, x), masked_fill_inputs()),
    # fused ops (functional.py)
    Case("softmax", lambda x, axis: F.softmax(x, axis), np_softmax, along_axis()),
    Case("log_softmax", lambda x, axis: F.log_softmax(x, axis), np_log_softmax, along_axis()),
    Case("cross_entropy", lambda z, targets, **kw: F.cross_entropy(z, targets, **kw),
         np_cross_entropy, cross_entropy_inputs()),
    Case("logsigmoid", F.logsigmoid, lambda x: -np.logaddexp(0, -x),
         unary(min_value=-10.0, max_value=10.0)),
    Case("log1mexp", F.log1mexp, lambda a: np.log(-np.expm1(a)), unary(min_value=-8.0, max_value=-0.05)),
    Case("logsigmoid_odds_ratio", F.logsigmoid_odds_ratio, np_logsigmoid_odds_ratio,
         no_params(*[mrt.arrays((3,), min_value=-6.0, max_value=-0.05)] * 2)),
    Case("layer_norm", F.layer_norm, np_layer_norm, layer_norm_inputs()),
    Case("gelu", F.gelu, np_gelu, unary(min_value=-4.0, max_value=4.0)),
    Case("embedding", lambda w, ids: F.embedding(ids, w), lambda w, ids: w[ids], embedding_inputs()),
    Case("rms_norm", F.rms_norm, np_rms_norm, rms_norm_inputs()),
    Case("silu", F.silu, np_silu, unary(min_value=-8.0, max_value=8.0)),
    Case("rope", lambda q, k, **kw: mr.stack(F.rope(q, k, **kw)), np_rope, rope_inputs()),
    Case("repeat_kv", F.repeat_kv, np_repeat_kv, repeat_kv_inputs()),
    Case("causal_attention", F.causal_attention, np_causal_attention, attention_inputs(False)),
    Case("causal_attention_kv_cache", F.causal_attention, np_causal_attention,
         attention_inputs(True)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@settings(max_examples=20, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_op_matches_numpy_and_passes_gradcheck(case, data, device):
    arrays, params = data.draw(case.inputs, label="arrays, params")
    tensors = [mr.tensor(a, requires_grad=True, device=device) for a in arrays]

    out = case.op(*tensors, **params)
    expected = np.asarray(case.ref(*arrays, **params))
    assert out.shape == expected.shape
    assert out.dtype == np.float64
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-12)

    assert mr.gradcheck(lambda *ts: case.op(*ts, **params), tensors)

    assert is_array(out.data, device)
    out.backward(mr.tensor(np.ones(out.shape), device=device))
    for t in tensors:
        assert t.grad is None or (is_array(t.grad, device) and t.grad.shape == t.shape)


def is_array(a, device):
    """An array of the device's module: NumPy's 0-d results are scalars, which must not leak out."""
    return isinstance(a, np.ndarray if device == "cpu" else type(backend.to_device(np.zeros(1), device)))


# ===================================================================================================
# 0-d tensors: every value and gradient is a 0-d array (NumPy's 0-d arithmetic gives scalars, which
# cannot be updated in place), gradients add up across calls, and gradcheck passes

CASES_BY_NAME = {c.name: c for c in CASES}
NO_AXIS = {"axis": None, "keepdims": False}
ZERO_D = [("add", 2, {}), ("sub", 2, {}), ("mul", 2, {}), ("div", 2, {}), ("pow_tensor", 2, {}),
          ("pow_scalar", 1, {"p": 3}), ("rpow", 1, {}), ("rsub_rdiv", 1, {}), ("neg", 1, {}),
          ("exp", 1, {}), ("log", 1, {}), ("sqrt", 1, {}), ("tanh", 1, {}), ("sigmoid", 1, {}),
          ("relu", 1, {}), ("logsigmoid", 1, {}), ("gelu", 1, {}), ("T", 1, {}),
          ("clip", 1, {"lo": -1.0, "hi": 1.0}), ("sum", 1, NO_AXIS), ("mean", 1, NO_AXIS),
          ("max", 1, NO_AXIS), ("reshape", 1, {"shape": (1, 1)}),
          ("where", 2, {"cond": np.array(True)}),
          ("masked_fill", 1, {"mask": np.array(False), "value": 2.5}),
          ("stack", 2, {"axis": 0})]


@pytest.mark.parametrize("name, n, params", ZERO_D, ids=[z[0] for z in ZERO_D])
def test_op_on_0d_tensors_gives_0d_arrays_and_gradients_that_add_up(name, n, params, device):
    case = CASES_BY_NAME[name]
    arrays = [np.array(v) for v in (0.7, 1.3)[:n]]
    tensors = [mr.tensor(a, requires_grad=True, device=device) for a in arrays]
    out = case.op(*tensors, **params)
    assert is_array(out.data, device)
    np.testing.assert_allclose(out.numpy(), case.ref(*arrays, **params), rtol=1e-12)

    out.sum().backward()
    first = [backend.to_numpy(t.grad).copy() for t in tensors]
    case.op(*tensors, **params).sum().backward()            # accumulates: t.grad + gy
    for t, g in zip(tensors, first):
        assert is_array(t.grad, device) and t.grad.shape == ()
        np.testing.assert_allclose(backend.to_numpy(t.grad), 2 * g, rtol=1e-12)
        t.grad *= 0.5                                        # in place, as clipping does
        np.testing.assert_allclose(backend.to_numpy(t.grad), g, rtol=1e-12)
    assert mr.gradcheck(lambda *ts: case.op(*ts, **params), tensors)


# ===================================================================================================
# conventions at the kinks (sampling stays away from them, so they are pinned here)


def grad_of(fn, values, device="cpu"):
    x = mr.tensor(np.array(values, dtype=np.float64), requires_grad=True, device=device)
    fn(x).sum().backward()
    return backend.to_numpy(x.grad)


def test_relu_gradient_at_zero_is_zero(device):
    assert grad_of(lambda x: x.relu(), [-1.0, 0.0, 2.0], device).tolist() == [0.0, 0.0, 1.0]


def test_max_splits_the_gradient_evenly_between_ties(device):
    assert grad_of(lambda x: x.max(), [1.0, 3.0, 3.0], device).tolist() == [0.0, 0.5, 0.5]
    assert grad_of(lambda x: x.max(axis=1), [[2.0, 2.0, 2.0, 2.0], [0.0, 1.0, 0.0, 1.0]],
                   device).tolist() == [[0.25] * 4, [0.0, 0.5, 0.0, 0.5]]


def test_clip_gradient_is_one_at_the_bounds(device):
    g = grad_of(lambda x: x.clip(0.0, 1.0), [-1.0, 0.0, 0.5, 1.0, 2.0], device)
    assert g.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_pow_exponent_gradient_is_zero_not_nan_at_base_zero(device):
    a = mr.tensor(np.array([0.0, 2.0]), device=device)
    b = mr.tensor(np.array([2.0, 3.0]), requires_grad=True, device=device)
    (a ** b).sum().backward()
    np.testing.assert_allclose(backend.to_numpy(b.grad), [0.0, 8 * math.log(2)])


def test_max_of_an_empty_tensor_raises_a_plain_value_error():
    with pytest.raises(ValueError, match="empty") as info:
        mr.tensor(np.zeros((0, 3))).max()
    assert not isinstance(info.value, mr.ShapeError)


def test_causal_attention_refuses_keys_and_values_of_another_batch():
    """k, v of batch 1 against q of batch 2 would broadcast forward but not backward: refused."""
    q = mr.tensor(np.ones((2, 1, 3, 4)), requires_grad=True)
    k = v = mr.tensor(np.ones((1, 1, 3, 4)), requires_grad=True)
    with pytest.raises(ValueError, match="same leading"):
        F.causal_attention(q, k, v)
