"""The gradient checker catches planted bugs, says where and by how much, and leaves constants alone.

Also: the hypothesis strategies of `minirlhf.testing` keep their promises, and the README's example.
"""

import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, strategies as st

import minirlhf as mr
import minirlhf.functional as F
import minirlhf.testing as mrt
from minirlhf import backend
from minirlhf.tensor import Function
from minirlhf.testing import broadcastable_arrays

rng = np.random.default_rng(0)
A, B = rng.standard_normal((3, 3)), rng.standard_normal((3, 3))


def on(device, array, requires_grad=True):
    return mr.tensor(np.asarray(array, dtype=np.float64), requires_grad=requires_grad, device=device)


# ===================================================================================================
# planted bugs


class CotangentTransposingMatMul(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a @ b

    def backward(self, gy):
        """Wrong on purpose: ga = gyᵀ bᵀ instead of gy bᵀ. A symmetric cotangent (all ones) hides it."""
        xp = backend.get_array_module(gy)
        return xp.swapaxes(gy, -1, -2) @ xp.swapaxes(self.b, -1, -2), xp.swapaxes(self.a, -1, -2) @ gy


class OnePercentOffExp(Function):
    def forward(self, x):
        self.y = backend.get_array_module(x).exp(x)
        return self.y

    def backward(self, gy):
        """Wrong on purpose: the gradient of element 2 is 1% too large."""
        gx = gy * self.y
        gx[2] *= 1.01
        return (gx,)


class AllOnePercentOffExp(Function):
    def forward(self, x):
        self.y = backend.get_array_module(x).exp(x)
        return self.y

    def backward(self, gy):
        """Wrong on purpose: every gradient is 1% too large."""
        return (1.01 * gy * self.y,)


class MulWrongForSecondInput(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a * b

    def backward(self, gy):
        """Right for a; wrong on purpose for b (which the tests pass as a constant)."""
        return gy * self.b, gy * 0 + 123.0


class AddForgettingSumTo(Function):
    def forward(self, a, b):
        return a + b

    def backward(self, gy):
        """Wrong on purpose: the broadcast input gets gy of the output's shape, not summed back."""
        return gy, gy


def test_transposed_backward_hides_behind_an_all_ones_cotangent_but_not_from_gradcheck(device):
    a, b = on(device, A), on(device, B)
    CotangentTransposingMatMul()(a, b).backward(np.ones((3, 3)))
    np.testing.assert_allclose(backend.to_numpy(a.grad), np.ones((3, 3)) @ B.T)  # looks right

    with pytest.raises(mr.GradcheckError, match="input 0"):
        mr.gradcheck(lambda a, b: CotangentTransposingMatMul()(a, b), [on(device, A), on(device, B)])


def test_a_one_percent_error_is_reported_with_all_the_numbers(device):
    x = on(device, [0.1, -0.4, 0.3, 0.7])
    with pytest.raises(mr.GradcheckError) as info:
        mr.gradcheck(lambda x: OnePercentOffExp()(x), x)
    message = str(info.value)

    assert "input 0" in message and "element (2,)" in message
    assert "eps=1e-06" in message and "atol=1e-05" in message and "rtol=0.001" in message
    analytic = float(re.search(r"analytic\s+(\S+)", message).group(1))
    numeric = float(re.search(r"numeric\s+(\S+)", message).group(1))
    assert analytic / numeric == pytest.approx(1.01, rel=1e-6)


def test_the_message_shows_the_tolerances_that_were_asked_for():
    with pytest.raises(mr.GradcheckError) as info:
        mr.gradcheck(lambda x: AllOnePercentOffExp()(x), np.array([0.5, 1.0]),
                     eps=1e-5, atol=1e-7, rtol=1e-4)
    assert "eps=1e-05, atol=1e-07, rtol=0.0001" in str(info.value)


def test_tolerances_decide_what_counts_as_wrong():
    assert mr.gradcheck(lambda x: AllOnePercentOffExp()(x), np.array([0.5, 1.0]), rtol=0.05)


@pytest.mark.parametrize("bug, inputs", [
    (lambda a, b: CotangentTransposingMatMul()(a, b), [A, B]),
    (lambda x: AllOnePercentOffExp()(x), [rng.standard_normal((4, 5))]),
])
def test_directional_mode_catches_planted_bugs(device, bug, inputs):
    with pytest.raises(mr.GradcheckError, match="along a random direction"):
        mr.gradcheck(bug, [on(device, x) for x in inputs], mode="directional")


def test_a_gradient_of_the_wrong_shape_is_caught(device):
    a, b = on(device, rng.standard_normal((3, 1))), on(device, rng.standard_normal((3, 4)))
    with pytest.raises(mr.GradcheckError, match=r"shape \(3, 4\).*shape \(3, 1\)"):
        mr.gradcheck(lambda a, b: AddForgettingSumTo()(a, b), [a, b])


def test_a_kink_is_named_in_the_message():
    with pytest.raises(mr.GradcheckError, match="kink"):
        mr.gradcheck(lambda x: x.relu(), np.array([0.0, 1.0]))


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="directional"):
        mr.gradcheck(lambda x: x.exp(), np.ones(2), mode="fast")


# ===================================================================================================
# correct ops pass; constants are not checked


@pytest.mark.parametrize("mode", ["full", "directional"])
def test_correct_ops_pass(device, mode):
    a, b = on(device, A), on(device, B)
    assert mr.gradcheck(lambda a, b: (a @ b).tanh() * a, [a, b], mode=mode)
    x, w = on(device, rng.standard_normal((2, 3))), on(device, rng.uniform(0.5, 1.5, 3))
    assert mr.gradcheck(lambda x, w: F.layer_norm(x, w, w), [x, w], mode=mode)


def test_functions_with_several_outputs_are_checked_on_each(device):
    x = on(device, rng.standard_normal((2, 3)))
    assert mr.gradcheck(lambda x: (x.exp(), x.sum(axis=0), F.softmax(x)), x)


def test_constant_tensors_are_not_checked(device):
    a, b = on(device, A), on(device, B, requires_grad=False)
    assert mr.gradcheck(lambda a, b: MulWrongForSecondInput()(a, b), [a, b])
    with pytest.raises(mr.GradcheckError, match="input 1"):
        mr.gradcheck(lambda a, b: MulWrongForSecondInput()(a, b), [a, on(device, B)])


def test_integer_and_boolean_inputs_are_constants_passed_unchanged(device):
    seen = []

    def fn(w, ids, mask):
        seen.append((ids.dtype, mask.dtype))
        return F.embedding(ids, w).masked_fill(mask, 0.0)

    w = on(device, rng.standard_normal((4, 3)))
    ids = backend.to_device(np.array([0, 2, 2]), device)
    mask = backend.to_device(np.array([[True], [False], [False]]), device)
    assert mr.gradcheck(fn, [w, ids, mask])
    assert all(ids.kind == "i" and mask == np.bool_ for ids, mask in seen)


def test_inputs_are_left_as_they_were():
    x = np.array([0.5, -1.0, 2.0], dtype=np.float32)
    before = x.copy()
    assert mr.gradcheck(lambda x: x * x, x)
    assert x.dtype == np.float32 and (x == before).all()


@pytest.mark.parametrize("inputs", [[np.array([1, 2])], [mr.tensor(np.ones(2))]])
def test_no_float_input_to_check_is_a_helpful_error(inputs):
    with pytest.raises(ValueError, match="no floating-point input"):
        mr.gradcheck(lambda x: x * 2, inputs)


# ===================================================================================================
# the strategies of minirlhf.testing, and the README's example


@given(broadcastable_arrays(2, away_from=[0.0]))
def test_readme_example_property(xs):
    a, b = xs                                     # float64, shapes like (3, 1) and (4,), or ()
    assert mr.gradcheck(lambda a, b: (a * b).relu(), [a, b])


@given(mrt.arrays(dtype=np.float32, min_value=-2.0, max_value=2.0, away_from=[0.0, 1.0], margin=0.2))
def test_arrays_keep_their_bounds_dtype_and_distance_from_kinks(x):
    assert x.dtype == np.float32 and np.isfinite(x).all()
    assert ((-2 <= x) & (x <= 2)).all()
    assert ((np.abs(x) >= 0.2) & (np.abs(x - 1) >= 0.2)).all()


@given(mrt.broadcastable_arrays(3))
def test_broadcastable_arrays_broadcast(xs):
    assert len(xs) == 3
    np.broadcast_shapes(*(x.shape for x in xs))


@given(mrt.unique_max_arrays())
def test_unique_max_arrays_have_distinct_elements(x):
    assert len(np.unique(x)) == x.size


@given(st.data())
def test_logits_and_int_targets_fit_together(data):
    z = data.draw(mrt.logits(num_classes=3))
    t = data.draw(mrt.int_targets(z.shape[:-1], 3, ignore_index=-100))
    assert z.shape[-1] == 3 and t.shape == z.shape[:-1] and t.dtype == np.int64
    assert np.isin(t, [0, 1, 2, -100]).all()


def test_import_minirlhf_does_not_import_hypothesis():
    code = ("import sys, minirlhf, minirlhf.functional; "
            "assert 'hypothesis' not in sys.modules and 'minirlhf.testing' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
