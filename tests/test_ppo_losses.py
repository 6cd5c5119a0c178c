"""PPO's building blocks (minirlhf.losses, "policy optimisation: PPO's blocks"): values against plain
NumPy, gradients against float64 finite differences, and the reductions that prove the surrogate is
the one PPO means: on-policy it is REINFORCE, and the clip zeroes the gradient exactly where it should."""

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import minirlhf as mr
from minirlhf.losses import clipped_surrogate, masked_mean, masked_var, masked_whiten
from minirlhf.testing import arrays


@st.composite
def masked_batches(draw, min_tokens=1):
    """(x, mask): x (B, T) float64 and a 0/1 mask, each row a run of completion tokens after a prompt
    and before padding, with at least ``min_tokens`` masked entries in all."""
    B, T = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    x = draw(arrays((B, T)))
    mask = np.zeros((B, T))
    for b in range(B):
        start = draw(st.integers(0, T - 1))
        mask[b, start:draw(st.integers(start + 1, T))] = 1
    assume(mask.sum() >= min_tokens)
    return x, mask


# ===================================================================================================
# masked_mean, masked_var, masked_whiten


@given(masked_batches())
def test_masked_mean_is_the_mean_of_the_selected_entries(batch):
    x, mask = batch
    assert masked_mean(x, mask) == pytest.approx(x[mask == 1].mean(), rel=1e-12)
    np.testing.assert_allclose(masked_mean(x, mask, axis=1),
                               [row[m == 1].mean() for row, m in zip(x, mask)], rtol=1e-12)
    assert masked_mean(mr.tensor(x), mask).item() == pytest.approx(masked_mean(x, mask), rel=1e-12)
    assert mr.gradcheck(lambda x: masked_mean(x, mask, axis=1), [x])


def test_masked_mean_ignores_what_lies_outside_the_mask_even_inf_and_nan():
    x = np.array([[1.0, 3.0, np.inf, np.nan]])
    assert masked_mean(x, np.array([[1, 1, 0, 0]])) == 2.0
    with pytest.raises(ValueError, match="selects no entry"):
        masked_mean(x, np.zeros((1, 4)))


@given(masked_batches(min_tokens=2))
def test_masked_var_is_the_unbiased_variance_and_whiten_standardises(batch):
    x, mask = batch
    sel = x[mask == 1]
    assert masked_var(x, mask) == pytest.approx(sel.var(ddof=1), rel=1e-9, abs=1e-12)
    assert masked_var(x, mask, unbiased=False) == pytest.approx(sel.var(), rel=1e-9, abs=1e-12)
    w = masked_whiten(x, mask)
    np.testing.assert_allclose(w[mask == 1], (sel - sel.mean()) / np.sqrt(sel.var(ddof=1) + 1e-8),
                               rtol=1e-9, atol=1e-12)
    assert (w[mask == 0] == 0).all()
    np.testing.assert_allclose(masked_whiten(x, mask, shift_mean=False)[mask == 1],
                               w[mask == 1] + sel.mean(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(masked_whiten(mr.tensor(x), mask).numpy(), w, rtol=1e-12, atol=1e-15)
    assume(sel.std() > 0.1)                                              # away from 1/sqrt(0)
    assert mr.gradcheck(lambda x: masked_whiten(x, mask), [x])
    assert mr.gradcheck(lambda x: masked_var(x, mask), [x])


def test_unbiased_variance_of_one_entry_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(np.array([[1.0, 2.0]]), np.array([[0, 1]]))


# ===================================================================================================
# clipped_surrogate


EPS = 0.2


def plain_surrogate(logp, old, A, mask, lo=EPS, hi=EPS):
    rho = np.exp(logp - old)
    A = A[:, None] if A.ndim == 1 else A
    return np.where(mask == 1, -np.minimum(rho * A, np.clip(rho, 1 - lo, 1 + hi) * A), 0)


@st.composite
def surrogate_batches(draw):
    """logp, old_logp near it (ρ in about [0.6, 1.6]), advantages (B,) or (B, T), a mask; ρ kept
    away from the kinks 1 ± ε so finite differences do not straddle them."""
    x, mask = draw(masked_batches())
    old = x + draw(arrays(x.shape, min_value=-0.5, max_value=0.5))
    per_token = draw(st.booleans())
    A = draw(arrays(x.shape if per_token else x.shape[:1], away_from=[0.0]))
    rho = np.exp(x - old)
    assume(np.abs(rho - (1 - EPS)).min() > 1e-3 and np.abs(rho - (1 + EPS)).min() > 1e-3)
    return x, old, A, mask


@given(surrogate_batches())
def test_clipped_surrogate_matches_numpy_and_gradcheck(batch):
    logp, old, A, mask = batch
    per_token, metrics = clipped_surrogate(mr.tensor(logp), old, A, mask, epsilon_low=EPS)
    np.testing.assert_allclose(per_token.numpy(), plain_surrogate(logp, old, A, mask), rtol=1e-12)
    assert mr.gradcheck(lambda lp: clipped_surrogate(lp, old, A, mask, epsilon_low=EPS)[0], [logp])

    rho, At, m = np.exp(logp - old), (A[:, None] if A.ndim == 1 else A) * np.ones_like(logp), mask == 1
    low, high = (rho < 1 - EPS) & (At < 0) & m, (rho > 1 + EPS) & (At > 0) & m
    assert metrics["clipfrac/low"] == pytest.approx(low.sum() / m.sum())
    assert metrics["clipfrac/high"] == pytest.approx(high.sum() / m.sum())
    assert metrics["clipfrac"] == pytest.approx((low | high).sum() / m.sum())
    assert metrics["approxkl"] == pytest.approx((0.5 * (logp - old) ** 2)[m].mean(), rel=1e-12)


@given(masked_batches(), arrays((3,)))
def test_on_policy_the_surrogate_gradient_is_reinforce(batch, a):
    """One epoch, one minibatch: old_logp = logp, so ρ = 1 and ∇L_t = -A_t·∇log p_θ(y_t) exactly."""
    logp, mask = batch
    A = a[:logp.shape[0]]                                               # (B,) one per sequence
    lp = mr.tensor(logp, requires_grad=True)
    per_token, metrics = clipped_surrogate(lp, logp.copy(), A, mask)
    per_token.sum().backward()
    np.testing.assert_array_equal(lp.grad, np.where(mask == 1, -A[:, None], 0))
    assert metrics["clipfrac"] == 0 and metrics["approxkl"] == 0


def test_the_clip_zeroes_the_gradient_exactly_where_it_should():
    """Zero gradient iff the ratio has left [1-ε, 1+ε] on the side the advantage rewards."""
    rho = np.array([0.5, 0.5, 0.9, 0.9, 1.1, 1.1, 1.5, 1.5])
    A = np.array([1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    old = np.zeros((1, 8))
    lp = mr.tensor(np.log(rho)[None], requires_grad=True)
    per_token, metrics = clipped_surrogate(lp, old, A[None], np.ones((1, 8)), epsilon_low=EPS)
    per_token.sum().backward()
    clipped = ((rho > 1 + EPS) & (A > 0)) | ((rho < 1 - EPS) & (A < 0))
    assert clipped.tolist() == [False, True, False, False, False, False, True, False]
    np.testing.assert_allclose(lp.grad[0], np.where(clipped, 0.0, -A * rho), rtol=1e-12)
    assert (lp.grad[0][clipped] == 0).all()
    assert metrics["clipfrac"] == 2 / 8 and metrics["clipfrac/low"] == metrics["clipfrac/high"] == 1 / 8


def test_epsilon_high_widens_the_upper_clip_only():
    lp = mr.tensor(np.log([[1.25, 0.75]]), requires_grad=True)
    per_token, metrics = clipped_surrogate(lp, np.zeros((1, 2)), np.array([[1.0, -1.0]]),
                                           np.ones((1, 2)), epsilon_low=0.2, epsilon_high=0.28)
    per_token.sum().backward()
    assert lp.grad[0, 0] == pytest.approx(-1.25)                        # 1.25 < 1.28: still free
    assert lp.grad[0, 1] == 0                                            # 0.75 < 0.8 with A < 0
    assert metrics["clipfrac/high"] == 0 and metrics["clipfrac/low"] == 0.5


def test_clipped_surrogate_refuses_bad_input():
    lp = mr.tensor(np.zeros((2, 3)))
    with pytest.raises(TypeError, match="Tensor"):
        clipped_surrogate(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros(2), np.ones((2, 3)))
    with pytest.raises(ValueError, match="advantages"):
        clipped_surrogate(lp, np.zeros((2, 3)), np.zeros(3), np.ones((2, 3)))
    with pytest.raises(ValueError, match="epsilon"):
        clipped_surrogate(lp, np.zeros((2, 3)), np.zeros(2), np.ones((2, 3)), epsilon_low=0)
    with pytest.raises(ValueError, match="mask"):
        clipped_surrogate(lp, np.zeros((2, 3)), np.zeros(2), np.ones((2, 2)))
