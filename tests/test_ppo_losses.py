"""PPO's building blocks (minirlhf.losses, "policy optimisation: PPO's blocks"): values against plain
NumPy, gradients against float64 finite differences, and the reductions that prove the surrogate is
the one PPO means: on-policy it is REINFORCE, and the clip zeroes the gradient exactly where it should."""

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import minirlhf as mr
from minirlhf.losses import (clipped_surrogate, gae, kl_k3, kl_penalty_rewards, masked_mean,
                             masked_var, masked_whiten, reinforce_kl_loss, value_loss)
from minirlhf.testing import arrays


@st.composite
def masked_batches(draw, min_tokens=1):
    """(x, mask): x (B, T) float64 and a boolean mask (what the blocks call ``keep``), each row a run
    of completion tokens after a prompt and before padding, with at least ``min_tokens`` in all."""
    B, T = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    x = draw(arrays((B, T)))
    mask = np.zeros((B, T), dtype=bool)
    for b in range(B):
        start = draw(st.integers(0, T - 1))
        mask[b, start:draw(st.integers(start + 1, T))] = True
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


def test_masked_blocks_keep_float32_as_float32():
    x, mask = np.arange(6, dtype=np.float32).reshape(2, 3), np.array([[1, 1, 0], [1, 0, 1]]) == 1
    for block in (masked_mean, masked_var, masked_whiten):
        assert block(x, mask).dtype == np.float32
        assert block(mr.tensor(x), mask).dtype == np.float32
    assert masked_mean(x, mask, axis=1).dtype == np.float32


def test_masked_blocks_on_a_small_example():
    assert masked_mean(np.array([[1.0, 2.0]]), np.array([[False, True]])) == 2.0
    assert masked_var(np.array([[1.0, 2.0, 4.0]]), np.array([[True, True, False]])) == 0.5
    np.testing.assert_allclose(masked_whiten(np.array([[1.0, 3.0, 9.0]]), np.array([[True, True, False]])),
                               [[-1 / np.sqrt(2 + 1e-8), 1 / np.sqrt(2 + 1e-8), 0]], rtol=1e-12)


def test_the_masked_blocks_take_a_ready_boolean_keep_of_the_values_shape():
    with pytest.raises(ValueError, match="keep must be a boolean array of shape"):
        masked_mean(np.ones((1, 2)), np.array([[0, 1]]))
    with pytest.raises(ValueError, match="keep must be a boolean array of shape"):
        masked_mean(np.ones((1, 2)), np.ones((1, 3), dtype=bool))


def test_masked_mean_ignores_what_lies_outside_the_mask_even_inf_and_nan():
    x = np.array([[1.0, 3.0, np.inf, np.nan]])
    assert masked_mean(x, np.array([[1, 1, 0, 0]]) == 1) == 2.0
    with pytest.raises(ValueError, match="selects no entry"):
        masked_mean(x, np.zeros((1, 4), dtype=bool))


@given(masked_batches(min_tokens=2))
def test_masked_var_is_the_unbiased_variance_and_whiten_standardises(batch):
    x, mask = batch
    sel = x[mask == 1]
    assert masked_var(x, mask) == pytest.approx(sel.var(ddof=1), rel=1e-9, abs=1e-12)
    assert masked_var(x, mask, unbiased=False) == pytest.approx(sel.var(), rel=1e-9, abs=1e-12)
    w = masked_whiten(x, mask)
    # x - μ carries the rounding of μ (~1e-16·|x|), which 1/sqrt(σ² + 1e-8) magnifies up to 1e4 times
    atol = 1e-10 * max(1.0, np.abs(sel).max())
    np.testing.assert_allclose(w[mask == 1], (sel - sel.mean()) / np.sqrt(sel.var(ddof=1) + 1e-8),
                               rtol=1e-9, atol=atol)
    assert (w[mask == 0] == 0).all()
    np.testing.assert_allclose(masked_whiten(x, mask, shift_mean=False)[mask == 1],
                               w[mask == 1] + sel.mean(), rtol=1e-9, atol=atol)
    np.testing.assert_allclose(masked_whiten(mr.tensor(x), mask).numpy(), w, rtol=1e-12, atol=1e-15)
    assume(sel.std() > 0.1)                                              # away from 1/sqrt(0)
    assert mr.gradcheck(lambda x: masked_whiten(x, mask), [x])
    assert mr.gradcheck(lambda x: masked_var(x, mask), [x])


def test_unbiased_variance_of_one_entry_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(np.array([[1.0, 2.0]]), np.array([[False, True]]))


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
    assert metrics["ratio"] == pytest.approx(rho[m].mean(), rel=1e-12)


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
    per_token, metrics = clipped_surrogate(lp, old, A[None], np.ones((1, 8), bool), epsilon_low=EPS)
    per_token.sum().backward()
    clipped = ((rho > 1 + EPS) & (A > 0)) | ((rho < 1 - EPS) & (A < 0))
    assert clipped.tolist() == [False, True, False, False, False, False, True, False]
    np.testing.assert_allclose(lp.grad[0], np.where(clipped, 0.0, -A * rho), rtol=1e-12)
    assert (lp.grad[0][clipped] == 0).all()
    assert metrics["clipfrac"] == 2 / 8 and metrics["clipfrac/low"] == metrics["clipfrac/high"] == 1 / 8


def test_epsilon_high_widens_the_upper_clip_only():
    lp = mr.tensor(np.log([[1.25, 0.75]]), requires_grad=True)
    per_token, metrics = clipped_surrogate(lp, np.zeros((1, 2)), np.array([[1.0, -1.0]]),
                                           np.ones((1, 2), bool), epsilon_low=0.2, epsilon_high=0.28)
    per_token.sum().backward()
    assert lp.grad[0, 0] == pytest.approx(-1.25)                        # 1.25 < 1.28: still free
    assert lp.grad[0, 1] == 0                                            # 0.75 < 0.8 with A < 0
    assert metrics["clipfrac/high"] == 0 and metrics["clipfrac/low"] == 0.5


def test_clipped_surrogate_refuses_bad_input():
    lp = mr.tensor(np.zeros((2, 3)))
    keep = np.ones((2, 3), bool)
    with pytest.raises(TypeError, match="Tensor"):
        clipped_surrogate(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros(2), keep)
    with pytest.raises(ValueError, match="advantages"):
        clipped_surrogate(lp, np.zeros((2, 3)), np.zeros(3), keep)
    with pytest.raises(ValueError, match="epsilon"):
        clipped_surrogate(lp, np.zeros((2, 3)), np.zeros(2), keep, epsilon_low=0)
    with pytest.raises(ValueError, match="keep"):
        clipped_surrogate(lp, np.zeros((2, 3)), np.zeros(2), np.ones((2, 2), bool))
    with pytest.raises(ValueError, match="keep"):
        clipped_surrogate(lp, np.zeros((2, 3)), np.zeros(2), np.ones((2, 3)))   # 0/1, not boolean


# ===================================================================================================
# kl_penalty_rewards


@given(masked_batches(), arrays((3, 5)), arrays((3,)), st.sampled_from(["k1", "k2", "k3"]))
def test_kl_penalty_rewards_put_the_kl_on_every_token_and_the_score_on_the_last(batch, ref, R, est):
    logp, mask = batch
    B, T = logp.shape
    ref, R = ref[:B, :T], R[:B]
    beta = 0.3
    rewards = kl_penalty_rewards(R, logp, ref, mask, beta, estimator=est)
    k = {"k1": logp - ref, "k2": 0.5 * (ref - logp) ** 2, "k3": kl_k3(logp, ref)}[est]
    for b in range(B):
        last = np.nonzero(mask[b])[0][-1]
        for t in range(T):
            expected = (-beta * k[b, t] + (R[b] if t == last else 0)) if mask[b, t] else 0
            assert rewards[b, t] == pytest.approx(expected, rel=1e-12, abs=1e-12)
    if est == "k1":                                                      # Σ_t r_t = R - β·KL_k1
        np.testing.assert_allclose(rewards.sum(1), R - beta * ((logp - ref) * mask).sum(1),
                                   rtol=1e-10, atol=1e-12)


def test_only_k1_per_token_rewards_sum_to_the_reinforce_reward():
    logp = np.log(np.array([[0.5, 0.2, 0.9], [0.3, 0.6, 0.1]]))
    ref = np.log(np.array([[0.4, 0.5, 0.7], [0.2, 0.3, 0.6]]))
    mask, R, beta = np.array([[1, 1, 1], [1, 1, 0]]) == 1, np.array([1.0, -2.0]), 0.3
    seq, ref_seq = (logp * mask).sum(1), (ref * mask).sum(1)
    _, metrics = reinforce_kl_loss(mr.tensor(seq), ref_seq, R, beta, baseline="none")
    shaped = R - beta * (seq - ref_seq)                                  # R̂ of reinforce_kl_loss
    k1_sum = kl_penalty_rewards(R, logp, ref, mask, beta, "k1").sum(1)
    np.testing.assert_allclose(k1_sum, shaped, rtol=1e-12)
    assert k1_sum.mean() == pytest.approx(metrics["reward_with_kl"], rel=1e-12)
    for est in ("k2", "k3"):                                             # a KL estimate, not R̂
        other = kl_penalty_rewards(R, logp, ref, mask, beta, est).sum(1)
        assert np.abs(other - shaped).max() > 1e-3


def test_kl_penalty_rewards_refuse_bad_input():
    with pytest.raises(ValueError, match="beta"):
        kl_penalty_rewards(np.zeros(1), np.zeros((1, 2)), np.zeros((1, 2)), np.ones((1, 2), bool), -1.0)
    with pytest.raises(ValueError, match="scores"):
        kl_penalty_rewards(np.zeros(2), np.zeros((1, 2)), np.zeros((1, 2)), np.ones((1, 2), bool), 0.1)
    with pytest.raises(ValueError, match="estimator"):
        kl_penalty_rewards(np.zeros(1), np.zeros((1, 2)), np.zeros((1, 2)), np.ones((1, 2), bool), 0.1, "k4")


# ===================================================================================================
# gae


def plain_gae(r, v, mask, gamma, lam):
    """GAE one sequence at a time over its list of completion tokens, as the formula reads."""
    adv = np.zeros_like(r)
    for b in range(r.shape[0]):
        ts = np.nonzero(mask[b])[0]
        a_next, v_next = 0.0, 0.0
        for t in ts[::-1]:
            a_next = r[b, t] + gamma * v_next - v[b, t] + gamma * lam * a_next
            v_next = v[b, t]
            adv[b, t] = a_next
    return adv


@given(masked_batches(), arrays((3, 5)), st.floats(0, 1), st.floats(0, 1))
def test_gae_is_the_backward_recursion(batch, v, gamma, lam):
    r, mask = batch
    v = v[:r.shape[0], :r.shape[1]]
    adv, ret = gae(r, v, mask, gamma=gamma, lam=lam)
    np.testing.assert_allclose(adv, plain_gae(r, v, mask, gamma, lam), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ret, np.where(mask == 1, adv + v, 0), rtol=1e-12, atol=1e-12)


@given(masked_batches(), arrays((3, 5)), st.floats(0, 1))
def test_gae_lambda_one_is_reward_to_go_minus_v_and_lambda_zero_the_td_error(batch, v, gamma):
    r, mask = batch
    v = v[:r.shape[0], :r.shape[1]]
    adv1, ret1 = gae(r, v, mask, gamma=gamma, lam=1.0)
    adv0, _ = gae(r, v, mask, gamma=gamma, lam=0.0)
    for b in range(r.shape[0]):
        ts = list(np.nonzero(mask[b])[0])
        for i, t in enumerate(ts):
            to_go = sum(gamma ** j * r[b, s] for j, s in enumerate(ts[i:]))
            v_next = v[b, ts[i + 1]] if i + 1 < len(ts) else 0.0
            assert adv1[b, t] == pytest.approx(to_go - v[b, t], rel=1e-9, abs=1e-9)
            assert ret1[b, t] == pytest.approx(to_go, rel=1e-9, abs=1e-9)
            assert adv0[b, t] == pytest.approx(r[b, t] + gamma * v_next - v[b, t], rel=1e-12, abs=1e-12)


def test_gae_refuses_gamma_or_lambda_outside_0_1():
    with pytest.raises(ValueError, match="gamma"):
        gae(np.zeros((1, 2)), np.zeros((1, 2)), np.ones((1, 2), bool), gamma=1.5)


# ===================================================================================================
# value_loss


C = 0.2


@st.composite
def value_batches(draw):
    x, mask = draw(masked_batches())
    d = draw(arrays(x.shape, min_value=-0.5, max_value=0.5))
    d = np.where(np.abs(np.abs(d) - C) < 1e-2, np.sign(d) * (C + 0.05), d)  # away from the clip's edges
    old = x + d
    R = draw(arrays(x.shape))
    # where the clip binds, the two squared errors differ (a unique max); unclipped, they are equal
    clipped = np.clip(x, old - C, old + C)
    tie = (np.abs(x - clipped) > 0) & (np.abs((x - R) ** 2 - (clipped - R) ** 2) < 1e-3)
    R = np.where(tie, R + 1.0, R)
    return x, old, R, mask


@given(value_batches())
def test_value_loss_matches_numpy_and_gradcheck(batch):
    v, old, R, mask = batch
    loss, metrics = value_loss(mr.tensor(v), old, R, mask, clip_range_value=C)
    l1, l2 = (v - R) ** 2, (np.clip(v, old - C, old + C) - R) ** 2
    m = mask == 1
    assert loss.item() == pytest.approx(0.5 * np.maximum(l1, l2)[m].mean(), rel=1e-12)
    assert metrics["clipfrac"] == pytest.approx((l2 > l1)[m].mean())
    assert mr.gradcheck(lambda v: value_loss(v, old, R, mask, clip_range_value=C)[0], [v])


def test_value_loss_stops_the_value_past_the_clip_from_moving_further():
    """V moved 0.5 above V_old towards R: the clipped error is larger, so it wins and its gradient is 0."""
    v = mr.tensor([[1.5, 1.5]], requires_grad=True)
    loss, metrics = value_loss(v, np.array([[1.0, 1.0]]), np.array([[3.0, 0.0]]), np.ones((1, 2), bool))
    loss.backward()
    assert v.grad[0, 0] == 0                                             # clip(1.5) = 1.2, further from 3
    assert v.grad[0, 1] == pytest.approx(0.5 * 2 * 1.5 / 2)              # moving away from R: free
    assert metrics["clipfrac"] == 0.5
