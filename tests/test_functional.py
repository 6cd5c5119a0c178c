"""The fused ops at their edges: extreme logits, ignored targets, bad ids, and dtypes kept.

Their values and gradients on ordinary inputs are checked by the table in test_ops.py.
"""

import numpy as np
import pytest

import minirlhf as mr
import minirlhf.functional as F
from minirlhf import backend


def on(device, values, dtype=np.float64, requires_grad=True):
    return mr.tensor(np.array(values, dtype=dtype), requires_grad=requires_grad, device=device)


def host(array):
    return backend.to_numpy(array)


# ===================================================================================================
# numerical stability: no overflow, no nan, no warning

HUGE_LOGITS = [[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4], [1e4, 1e4, -1e4]]


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_of_huge_logits_is_finite_and_exact(device, dtype):
    z = on(device, HUGE_LOGITS, dtype)
    p = F.softmax(z)
    p.backward(host(np.arange(9.0).reshape(3, 3)).astype(dtype))
    np.testing.assert_allclose(p.numpy(), [[1, 0, 0], [1 / 3] * 3, [0.5, 0.5, 0]], atol=1e-6)
    assert np.isfinite(host(z.grad)).all()


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_log_softmax_of_huge_logits_is_finite_and_exact(device, dtype):
    z = on(device, HUGE_LOGITS, dtype)
    logp = F.log_softmax(z)
    logp.backward(np.ones((3, 3), dtype=dtype))
    expected = [[0, -2e4, -1e4], [-np.log(3)] * 3, [-np.log(2), -np.log(2), -2e4 - np.log(2)]]
    np.testing.assert_allclose(logp.numpy(), expected, rtol=1e-6)
    assert np.isfinite(host(z.grad)).all()


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_of_huge_logits_is_finite_and_exact(device, dtype):
    z = on(device, HUGE_LOGITS, dtype)
    loss = F.cross_entropy(z, np.array([1, 0, 0]), reduction="none")
    loss.backward(np.ones(3, dtype=dtype))
    np.testing.assert_allclose(loss.numpy(), [2e4, np.log(3), np.log(2)], rtol=1e-6)
    # d loss_i / dz_i = softmax(z_i) - onehot(t_i)
    np.testing.assert_allclose(host(z.grad), [[1, -1, 0], [-2 / 3, 1 / 3, 1 / 3], [-0.5, 0.5, 0]],
                               atol=1e-6)


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_logsigmoid_of_huge_inputs_is_exact(device, dtype):
    x = on(device, [1e3, -1e3], dtype)
    y = F.logsigmoid(x)
    y.sum().backward()
    assert y.numpy().tolist() == [0.0, -1e3]
    assert host(x.grad).tolist() == [0.0, 1.0]  # d/dx log σ(x) = σ(-x)


@pytest.mark.filterwarnings("error")
def test_sigmoid_of_huge_inputs_saturates_without_overflow(device):
    x = on(device, [1e3, -1e3], np.float32)
    y = x.sigmoid()
    y.sum().backward()
    assert y.numpy().tolist() == [1.0, 0.0]
    assert host(x.grad).tolist() == [0.0, 0.0]


# ===================================================================================================
# cross_entropy with ignored targets


def test_ignored_rows_neither_add_loss_nor_count_in_the_mean(device):
    z = on(device, [[2.0, 0.0], [0.0, 2.0], [5.0, -5.0]])
    loss = F.cross_entropy(z, np.array([0, -100, 1]))
    loss.backward()
    kept = F.cross_entropy(on(device, [[2.0, 0.0], [5.0, -5.0]]), np.array([0, 1]))
    np.testing.assert_allclose(loss.item(), kept.item())
    assert host(z.grad)[1].tolist() == [0.0, 0.0]


def test_custom_ignore_index(device):
    z = on(device, [[2.0, 0.0], [0.0, 2.0]])
    loss = F.cross_entropy(z, np.array([0, 1]), ignore_index=1, reduction="sum")
    np.testing.assert_allclose(loss.item(), np.log1p(np.exp(-2.0)))


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_all_ignored_sum_and_none_give_zero_loss_and_zero_gradient(device, reduction):
    z = on(device, np.zeros((2, 3, 4)))
    loss = F.cross_entropy(z, np.full((2, 3), -100), reduction=reduction)
    loss.backward(np.ones(loss.shape))
    assert (loss.numpy() == 0).all()
    assert (host(z.grad) == 0).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_all_ignored_mean_is_nan_as_in_pytorch(device):
    z = on(device, np.zeros((3, 4)))
    assert np.isnan(F.cross_entropy(z, np.full(3, -100)).item())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_all_ignored_mean_gives_zero_gradient_not_nan(device):
    z = on(device, np.zeros((3, 4)))
    F.cross_entropy(z, np.full(3, -100)).backward()
    assert (host(z.grad) == 0).all()


def test_rope_scores_depend_on_the_distance_between_positions_only(device):
    """q·k after rotating q to position m and k to n is a function of m - n: a shift of both by 5
    changes no score."""
    rng = np.random.default_rng(0)
    q, k = (on(device, rng.standard_normal((1, 2, 4, 6))) for _ in range(2))
    pos = np.array([0, 3, 4, 9])
    scores = [(lambda a, b: (a @ b.transpose(-1, -2)).numpy())(*F.rope(q, k, p)) for p in (pos, pos + 5)]
    np.testing.assert_allclose(scores[0], scores[1], rtol=1e-10, atol=1e-10)


def test_rope_is_the_papers_interleaved_rotation_up_to_a_permutation_of_the_head(device):
    """The paper rotates neighbours (x_2i, x_2i+1) by m·θ_i; permuting the head's columns so that
    2i -> i and 2i+1 -> i + hs/2 turns that into our rotate-half form, and every score q·k is the same."""
    rng = np.random.default_rng(2)
    hs, pos = 6, np.array([0, 2, 5])
    q, k = rng.standard_normal((3, hs)), rng.standard_normal((3, hs))

    def interleaved(x):
        y = x.copy()
        for i in range(hs // 2):
            angle = pos * 10000.0 ** (-2 * i / hs)
            a, b = x[:, 2 * i], x[:, 2 * i + 1]
            y[:, 2 * i], y[:, 2 * i + 1] = a * np.cos(angle) - b * np.sin(angle), a * np.sin(angle) + b * np.cos(angle)
        return y

    perm = np.concatenate([np.arange(0, hs, 2), np.arange(1, hs, 2)])   # column j of ours: x[perm[j]]
    ours_q, ours_k = F.rope(on(device, q[:, perm]), on(device, k[:, perm]), pos)
    np.testing.assert_allclose(ours_q.numpy(), interleaved(q)[:, perm], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ours_q.numpy() @ ours_k.numpy().T, interleaved(q) @ interleaved(k).T,
                               rtol=1e-12, atol=1e-12)


def test_rope_at_position_0_is_the_identity_and_keeps_norms(device):
    rng = np.random.default_rng(1)
    x = on(device, rng.standard_normal((1, 1, 3, 4)))
    at0, _ = F.rope(x, x, np.zeros(3, dtype=np.int64))
    np.testing.assert_allclose(at0.numpy(), x.numpy(), rtol=0, atol=0)
    moved, _ = F.rope(x, x, np.array([1, 7, 100]))
    np.testing.assert_allclose(np.linalg.norm(moved.numpy(), axis=-1), np.linalg.norm(x.numpy(), axis=-1))


def test_rope_refuses_an_odd_head_size(device):
    x = on(device, np.ones((1, 1, 2, 3)))
    with pytest.raises(ValueError, match="head size must be even"):
        F.rope(x, x, np.arange(2))


def test_rms_norm_of_float64_stays_float64_and_of_float32_stays_float32(device):
    for dtype in (np.float64, np.float32):
        x = on(device, np.ones((2, 3)), dtype)
        assert F.rms_norm(x, on(device, np.ones(3), dtype)).dtype == dtype


def test_gelu_of_a_0d_tensor_stays_an_array(device):  # in-place ops once broke here
    x = on(device, 1.0)
    y = F.gelu(x)
    y.backward()
    assert y.shape == () and x.grad.shape == ()
    np.testing.assert_allclose(y.item(), 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * 1.044715)))


# ===================================================================================================
# ids out of range are refused (CuPy would wrap them around silently)


@pytest.mark.parametrize("bad", [3, 7, -1])
def test_out_of_range_target_raises_with_its_value(device, bad):
    z = on(device, np.zeros((2, 3)))
    with pytest.raises(IndexError, match=f"{bad}"):
        F.cross_entropy(z, np.array([0, bad]))


@pytest.mark.parametrize("bad", [4, 99, -2])
def test_out_of_range_embedding_id_raises_with_its_value(device, bad):
    w = on(device, np.zeros((4, 2)))
    with pytest.raises(IndexError, match=f"{bad}"):
        F.embedding(np.array([[0, 1], [bad, 2]]), w)


def test_embedding_gradient_adds_up_over_repeated_ids(device):
    w = on(device, np.zeros((3, 2)))
    y = F.embedding(np.array([[1, 1], [1, 0]]), w)                 # (2, 2, 2)
    y.backward(np.arange(8.0).reshape(2, 2, 2))
    assert host(w.grad).tolist() == [[6, 7], [0 + 2 + 4, 1 + 3 + 5], [0, 0]]


def test_cross_entropy_refuses_float_targets_and_mismatched_shapes(device):
    z = on(device, np.zeros((2, 3)))
    with pytest.raises(TypeError, match="integers"):
        F.cross_entropy(z, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"\(3,\)"):
        F.cross_entropy(z, np.array([0, 1, 2]))


# ===================================================================================================
# float32 stays float32: forward values, every Function's backward, and the leaves' gradients

rng = np.random.default_rng(0)
X = rng.uniform(0.5, 1.5, (2, 3, 4))       # positive, so log/sqrt/pow are defined
Y = rng.uniform(0.5, 1.5, (2, 3, 4))
W = rng.uniform(0.5, 1.5, (4,))

FLOAT32_OPS = {
    "add": lambda x, y, w: x + y,
    "add_scalar": lambda x, y, w: x + 1.0,
    "radd_int": lambda x, y, w: 1 + x,
    "sub_scalar": lambda x, y, w: x - 1,
    "rsub_scalar": lambda x, y, w: 1.0 - x,
    "mul_numpy_float64_scalar": lambda x, y, w: x * np.float64(2.0),
    "rmul_scalar": lambda x, y, w: 2.0 * x,
    "div": lambda x, y, w: x / y,
    "div_scalar": lambda x, y, w: x / 3,
    "rdiv_scalar": lambda x, y, w: 2.0 / x,
    "pow_int": lambda x, y, w: x ** 2,
    "pow_float": lambda x, y, w: x ** 0.5,
    "pow_tensor": lambda x, y, w: x ** y,
    "rpow": lambda x, y, w: 2.0 ** x,
    "neg": lambda x, y, w: -x,
    "matmul": lambda x, y, w: x @ w,
    "matmul_batched": lambda x, y, w: x @ y.transpose(-1, -2),
    "rmatmul_float64_ndarray": lambda x, y, w: np.ones((5, 2)) @ x.reshape(2, 12),
    "mul_float64_ndarray": lambda x, y, w: x * np.ones(4),
    "sum": lambda x, y, w: x.sum(),
    "mean": lambda x, y, w: x.mean(axis=1),
    "max": lambda x, y, w: x.max(axis=-1),
    "max_all": lambda x, y, w: x.max(),
    "reshape": lambda x, y, w: x.reshape(6, 4),
    "permute": lambda x, y, w: x.permute(2, 0, 1),
    "T": lambda x, y, w: x.T,
    "getitem_slice": lambda x, y, w: x[0, ::-1],
    "getitem_ints": lambda x, y, w: x[[0, 0, 1]],
    "exp": lambda x, y, w: x.exp(),
    "log": lambda x, y, w: x.log(),
    "sqrt": lambda x, y, w: x.sqrt(),
    "tanh": lambda x, y, w: x.tanh(),
    "sigmoid": lambda x, y, w: x.sigmoid(),
    "relu": lambda x, y, w: (x - 1.0).relu(),
    "clip": lambda x, y, w: x.clip(0.7, 1.2),
    "where": lambda x, y, w: mr.where(x > 1, x, 0.0),
    "masked_fill": lambda x, y, w: x.masked_fill(x > 1, -1e9),
    "concatenate": lambda x, y, w: mr.concatenate([x, y], axis=1),
    "stack": lambda x, y, w: mr.stack([x, y], axis=-1),
    "softmax": lambda x, y, w: F.softmax(x),
    "log_softmax": lambda x, y, w: F.log_softmax(x, axis=0),
    "cross_entropy_mean": lambda x, y, w: F.cross_entropy(x, np.array([[0, 1, -100], [3, 2, 1]])),
    "cross_entropy_sum": lambda x, y, w: F.cross_entropy(x, np.zeros((2, 3), int), reduction="sum"),
    "cross_entropy_none": lambda x, y, w: F.cross_entropy(x, np.ones((2, 3), int), reduction="none"),
    "logsigmoid": lambda x, y, w: F.logsigmoid(x),
    "layer_norm": lambda x, y, w: F.layer_norm(x, w, w),
    "gelu": lambda x, y, w: F.gelu(x),
    "rms_norm": lambda x, y, w: F.rms_norm(x, w),
    "silu": lambda x, y, w: F.silu(x),
    "rope": lambda x, y, w: mr.stack(F.rope(x[None], y[None], np.arange(3))),
    "repeat_kv": lambda x, y, w: F.repeat_kv(x[None], 2),
    "embedding": lambda x, y, w: F.embedding(np.array([1, 1, 0]), x.reshape(6, 4)),
    "causal_attention": lambda x, y, w: F.causal_attention(x[None], y[None], y[None]),
    "causal_attention_kv_cache": lambda x, y, w: F.causal_attention(x[None, :, 1:], y[None], y[None]),
    "self_attention": lambda x, y, w: F.self_attention(x.reshape(2, 2, 6), 2),
}
def backward_dtypes(out):
    """The dtype of every gradient every Function of the graph of ``out`` returns (cotangent 1)."""
    dtypes, stack, seen = [], [out], set()
    while stack:
        t = stack.pop()
        if t._ctx is None or id(t) in seen:
            continue
        seen.add(id(t))
        xp = backend.get_array_module(t.data)
        for gx in t._ctx.backward(xp.ones_like(t.data)):
            if gx is not None:
                dtypes.append((type(t._ctx).__name__, gx.dtype))
        stack.extend(t._ctx.inputs)
    return dtypes


@pytest.mark.parametrize("name", FLOAT32_OPS)
def test_float32_stays_float32(device, name):
    x, y, w = (on(device, a, np.float32) for a in (X, Y, W))
    out = FLOAT32_OPS[name](x, y, w)
    assert out.dtype == np.float32

    assert all(dtype == np.float32 for _, dtype in backward_dtypes(out)), backward_dtypes(out)

    out.backward(backend.get_array_module(out.data).ones_like(out.data))
    for leaf in (x, y, w):
        assert leaf.grad is None or leaf.grad.dtype == np.float32


@pytest.mark.parametrize("op", [lambda t: t + 0.5, lambda t: t * 0.5, lambda t: t / 2],
                         ids=["int + 0.5", "int * 0.5", "int / 2"])
def test_integer_tensor_with_a_python_float_gives_float32(device, op):
    assert op(mr.tensor(np.array([1, 2]), device=device)).dtype == np.float32
