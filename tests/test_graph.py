"""The graph: how gradients flow, add up and stop, how it is freed, and what it refuses."""

import gc
import tracemalloc
import weakref

import numpy as np
import pytest

import minirlhf as mr
from minirlhf import backend
from minirlhf.optim import clip_grad_norm_


def leaf(values, device="cpu"):
    return mr.tensor(np.array(values, dtype=np.float64), requires_grad=True, device=device)


def host(array):
    return backend.to_numpy(array)


# ===================================================================================================
# how gradients flow


def test_a_tensor_used_twice_gets_the_sum_of_both_gradients(device):
    x = leaf([1.0, -2.0, 3.0], device)
    (x * x + x).sum().backward()                  # d/dx (x² + x) = 2x + 1
    assert host(x.grad).tolist() == [3.0, -3.0, 7.0]


def test_diamond_graph_adds_the_gradients_of_both_branches(device):
    x = leaf([2.0], device)
    h = x * 3.0
    ((h * h) + h.exp()).sum().backward()          # d/dx (9x² + e^{3x}) = 18x + 3e^{3x}
    np.testing.assert_allclose(host(x.grad), [36 + 3 * np.exp(6.0)])


def test_gradients_accumulate_across_backward_calls(device):
    x = leaf([1.0, 2.0], device)
    (x * 3.0).sum().backward()
    (x * x).sum().backward()
    assert host(x.grad).tolist() == [3 + 2, 3 + 4]


def test_retain_graph_allows_a_second_backward(device):
    x = leaf([1.0, 2.0], device)
    loss = (x * x).sum()
    loss.backward(retain_graph=True)
    loss.backward()
    assert host(x.grad).tolist() == [4.0, 8.0]


def test_a_second_backward_without_retain_graph_raises(device):
    x = leaf([1.0, 2.0], device)
    loss = (x * x).sum()
    loss.backward()
    with pytest.raises(RuntimeError):
        loss.backward()


def test_no_grad_builds_no_graph(device):
    x = leaf([1.0, 2.0], device)
    with mr.no_grad():
        y = (x * 2).exp().sum()
    assert not y.requires_grad and y._ctx is None
    assert mr.is_grad_enabled()


def test_no_grad_restores_grad_mode_after_an_exception():
    with pytest.raises(ZeroDivisionError):
        with mr.no_grad():
            1 / 0
    assert mr.is_grad_enabled()


def test_detach_cuts_the_graph(device):
    x = leaf([1.0, 2.0], device)
    d = (x * 2).detach()
    assert not d.requires_grad and d._ctx is None
    (d * x).sum().backward()                      # d is a constant 2x: the gradient is 2x, not 4x
    assert host(x.grad).tolist() == [2.0, 4.0]


def test_ten_thousand_op_chain_backward_needs_no_recursion(device):
    x = leaf([1.0], device)
    y = x
    for _ in range(10_000):
        y = y * 1.0001
    y.sum().backward()
    np.testing.assert_allclose(host(x.grad), [1.0001 ** 10_000])


def test_dropping_a_deep_graph_without_backward_is_fine():
    x = leaf([1.0])
    y = x
    for _ in range(50_000):
        y = y + 1.0
    del y  # freeing 50k nested nodes must not overflow the C stack
    gc.collect()


# ===================================================================================================
# the graph is released


def test_backward_frees_the_graph_of_intermediates(device):
    x = leaf([1.0, 2.0], device)
    h = x * 2                                     # the user still holds an intermediate
    fn = weakref.ref(h._ctx)
    (h.exp()).sum().backward()
    assert not h._ctx.inputs                      # it no longer holds its inputs
    assert fn() is None                           # its Function (and saved arrays) are gone


def graph_functions(out):
    found, stack = [], [out]
    while stack:
        t = stack.pop()
        if t._ctx is not None:
            found.append(t._ctx)
            stack.extend(t._ctx.inputs)
    return found


def test_memory_does_not_grow_over_training_iterations():
    rng = np.random.default_rng(0)
    x, target = rng.standard_normal((32, 16)), rng.standard_normal((32, 4))
    w1 = mr.tensor(rng.standard_normal((16, 32)) * 0.1, requires_grad=True)
    w2 = mr.tensor(rng.standard_normal((32, 4)) * 0.1, requires_grad=True)

    def step(functions_seen=None):
        loss = (((x @ w1).relu() @ w2 - target) ** 2).mean()
        if functions_seen is not None:
            functions_seen.extend(weakref.ref(f) for f in graph_functions(loss))
        loss.backward()
        for w in (w1, w2):
            w.data -= 0.01 * w.grad
            w.grad = None

    functions = []
    for _ in range(5):
        step(functions)
    gc.collect()
    assert functions and all(ref() is None for ref in functions)  # every graph was freed

    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(50):
        step()
    gc.collect()
    growth = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert growth < 10_000, f"memory grew by {growth} bytes over 50 steps"


# ===================================================================================================
# what backward refuses


def test_backward_on_a_non_scalar_without_grad_names_the_shape(device):
    y = leaf(np.ones((2, 3)), device) * 2
    with pytest.raises(RuntimeError, match=r"\(2, 3\)"):
        y.backward()


def test_backward_with_a_gradient_of_the_wrong_shape_raises(device):
    y = leaf(np.ones((2, 3)), device) * 2
    with pytest.raises(mr.ShapeError, match=r"\(3, 2\).*\(2, 3\)"):
        y.backward(np.ones((3, 2)))


def test_backward_on_a_tensor_without_grad_raises():
    with pytest.raises(RuntimeError, match="requires_grad"):
        mr.tensor([1.0, 2.0]).sum().backward()


# ===================================================================================================
# what a Tensor refuses


@pytest.mark.parametrize("data", [[1, 2], np.array([True, False]), np.arange(3, dtype=np.uint8)])
def test_integer_and_boolean_tensors_cannot_require_grad(data):
    with pytest.raises(TypeError, match="floating-point"):
        mr.tensor(data, requires_grad=True)
    with pytest.raises(TypeError, match="floating-point"):
        mr.tensor(data).requires_grad_()


@pytest.mark.parametrize("data", [np.array([1 + 2j]), ["a", "b"], np.array([object()], dtype=object),
                                  np.array(["2024-01-01"], dtype="datetime64[D]")])
def test_unsupported_dtypes_are_refused(data):
    with pytest.raises(TypeError, match="unsupported dtype"):
        mr.tensor(data)


def test_python_floats_become_float32_and_numpy_arrays_and_scalars_keep_their_dtype():
    assert mr.tensor([1.0, 2.0]).dtype == np.float32
    assert mr.tensor(2.0).dtype == np.float32
    assert mr.tensor(np.array([1.0, 2.0])).dtype == np.float64
    assert mr.tensor([1, 2]).dtype.kind == "i"
    for scalar in (np.float64(2.5), np.float32(2.5), np.float16(2.5)):  # as torch.tensor does
        t = mr.tensor(scalar)
        assert t.dtype == scalar.dtype and type(t.data) is np.ndarray and t.shape == ()


def test_data_and_grad_must_be_arrays():
    x = leaf([1.0, 2.0])
    with pytest.raises(TypeError, match="must be an array"):
        x.data = 3.0
    with pytest.raises(TypeError, match="must be an array"):
        x.grad = [1.0, 1.0]


def test_add_shape_mismatch_names_the_op_and_both_shapes(device):
    a, b = leaf(np.ones((2, 3)), device), leaf(np.ones(4), device)
    with pytest.raises(mr.ShapeError, match=r"add.*\(2, 3\).*\(4,\)"):
        a + b


@pytest.mark.parametrize("shape_a, shape_b", [((2, 3), (4, 5)), ((2, 3, 4), (5, 4, 6))])
def test_matmul_shape_mismatch_names_the_op_and_both_shapes(device, shape_a, shape_b):
    a, b = leaf(np.ones(shape_a), device), leaf(np.ones(shape_b), device)
    with pytest.raises(mr.ShapeError, match="matmul") as info:
        a @ b
    assert str(shape_a) in str(info.value) and str(shape_b) in str(info.value)


def test_matmul_vector_mismatch_names_the_shapes_passed(device):
    a, b = leaf(np.ones(3), device), leaf(np.ones(4), device)
    with pytest.raises(mr.ShapeError) as info:
        a @ b
    assert "(3,)" in str(info.value) and "(4,)" in str(info.value)


# ===================================================================================================
# gradients are the leaves' own arrays


def test_leaf_gradients_do_not_alias_each_other(device):
    a, b = leaf([1.0, 2.0], device), leaf([3.0, 4.0], device)
    (a + b).sum().backward()                      # both receive the very same gy
    a.grad += 1
    assert host(b.grad).tolist() == [1.0, 1.0]


def test_leaf_gradients_are_writable_and_do_not_alias_the_cotangent(device):
    x = leaf(np.ones((2, 3)), device)
    x.sum().backward()                            # the sum's backward broadcasts a read-only view
    x.grad *= 0.5                                 # an in-place optimizer update must work
    assert host(x.grad).tolist() == [[0.5] * 3] * 2

    y = leaf([1.0, 2.0], device)
    g = backend.to_device(np.array([1.0, 1.0]), device)
    y.backward(g)
    g += 1
    assert host(y.grad).tolist() == [1.0, 1.0]


# ===================================================================================================
# 0-d tensors: .data and .grad are 0-d arrays, never NumPy scalars (which cannot change in place)


def test_a_0d_leafs_gradient_is_a_0d_array_after_backward_and_after_accumulation(device):
    s = leaf(2.0, device)
    xp = type(s.data)
    (s * s * 5.0).backward()                      # NumPy gives np.float64 for 0-d arithmetic
    assert type(s.grad) is xp and s.grad.shape == () and host(s.grad) == 20.0
    (s * 3.0).backward()                          # t.grad + gy: a scalar again in NumPy
    assert type(s.grad) is xp and host(s.grad) == 23.0
    s.grad[...] = 1.0                             # raised on a scalar
    assert host(s.grad) == 1.0


def test_the_result_of_an_op_on_0d_tensors_is_a_0d_array(device):
    s = leaf(2.0, device)
    for out in (s * s, s.exp(), (s + 1.0).log(), leaf([1.0, 2.0], device).sum(), -s):
        assert type(out.data) is type(s.data) and out.shape == ()


def test_assigning_a_numpy_scalar_stores_a_0d_array_of_its_dtype():
    s = leaf(2.0)
    s.data = s.data * 0.5                         # np.float64 in NumPy
    assert type(s.data) is np.ndarray and s.data.dtype == np.float64 and s.data == 1.0
    s.data = np.float32(3.0)
    assert type(s.data) is np.ndarray and s.data.dtype == np.float32
    s.grad = np.float64(4.0)
    assert type(s.grad) is np.ndarray and s.grad.shape == ()


def test_clip_grad_norm_clips_a_0d_gradient_as_torch_does():
    """The issue's reproduction: the norm was reported but the scalar gradient left unclipped."""
    s = mr.tensor(np.array(2.0), requires_grad=True)
    (s * s * 5.0).backward()
    assert clip_grad_norm_([s], 1.0) == 20.0
    assert s.grad == 0.9999999500000024           # torch.nn.utils.clip_grad_norm_, torch 2.13
