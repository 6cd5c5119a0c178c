"""GRPO's blocks (minirlhf.losses, "GRPO's blocks") against a NumPy transcription of TRL's
GRPOTrainer formulas (written here from TRL's documentation, no TRL needed): values on
hypothesis-drawn inputs, gradients against central differences of that reference, and the
errors for input no GRPO run could use."""

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import minirlhf as mr
from minirlhf.losses import aggregate_tokens, group_advantages, grpo_loss
from minirlhf.testing import arrays

# ===================================================================================================
# the reference: TRL's formulas, in NumPy


def trl_advantages(rewards, G, scale):
    """TRL: mean and std (torch.std, ddof=1) of each group of G, or the std of the whole batch."""
    groups = rewards.reshape(-1, G)
    A = rewards - np.repeat(groups.mean(1), G)
    if scale == "group":
        return A / (np.repeat(groups.std(1, ddof=1), G) + 1e-4)
    if scale == "batch":
        return A / (rewards.std(ddof=1) + 1e-4)
    return A


def trl_loss(logp, old, ref, A, mask, beta, lo, hi, loss_type, max_len, bias_correction=False):
    """TRL's GRPOTrainer._compute_loss with token-level importance sampling, as NumPy."""
    coef_1 = np.exp(logp - old)
    coef_2 = np.clip(coef_1, 1 - lo, 1 + hi)
    per_token = -np.minimum(coef_1 * A[:, None], coef_2 * A[:, None])
    if beta != 0:
        kl = np.exp(ref - logp) - (ref - logp) - 1
        if bias_correction:
            kl = kl * coef_1
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / np.maximum(mask.sum(-1), 1)).mean()
    if loss_type in ("bnpo", "dapo"):          # dapo: num_items_in_batch = mask.sum() for one batch
        return (per_token * mask).sum() / max(mask.sum(), 1)
    return (per_token * mask).sum() / (per_token.shape[0] * max_len)


def numeric_grad(f, x, eps=1e-6):
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += eps
        down[i] -= eps
        g[i] = (f(up) - f(down)) / (2 * eps)
    return g


# ===================================================================================================
# group_advantages


@given(st.integers(1, 3), st.integers(2, 4), st.sampled_from(["group", "batch", "none"]),
       st.data())
def test_group_advantages_are_trls(n_groups, G, scale, data):
    rewards = data.draw(arrays((n_groups * G,)))
    np.testing.assert_allclose(group_advantages(rewards, G, scale), trl_advantages(rewards, G, scale),
                               rtol=1e-12, atol=1e-12)


def test_group_advantages_use_the_unbiased_std_and_zero_a_group_that_agrees():
    A = group_advantages(np.array([0.0, 2.0, 5.0, 5.0]), 2)
    np.testing.assert_allclose(A[:2], [-1 / (np.sqrt(2) + 1e-4), 1 / (np.sqrt(2) + 1e-4)])
    assert (A[2:] == 0).all()                                            # std 0, not nan


def test_group_advantages_take_plain_lists():
    np.testing.assert_array_equal(group_advantages([1.0, 2.0, 3.0, 5.0], 2, scale="none"),
                                  [-0.5, 0.5, -1.0, 1.0])
    np.testing.assert_allclose(group_advantages([1.0, 2.0, 3.0, 5.0], 2),
                               group_advantages(np.array([1.0, 2.0, 3.0, 5.0]), 2), rtol=0)
    assert aggregate_tokens(np.array([[1.0, 3.0], [5.0, 7.0]]), np.array([[1, 1], [1, 0]]) == 1,
                            "grpo") == (2 + 5) / 2


def test_group_advantages_refuse_bad_input():
    with pytest.raises(ValueError, match="does not divide"):
        group_advantages(np.zeros(6), 4)
    with pytest.raises(ValueError, match="2 or more samples per prompt"):
        group_advantages(np.zeros(6), 1, scale="group")
    with pytest.raises(ValueError, match="scale"):
        group_advantages(np.zeros(6), 2, scale="std")
    np.testing.assert_array_equal(group_advantages(np.arange(3.0), 1, scale="none"), 0)


# ===================================================================================================
# aggregate_tokens and grpo_loss


EPS_LO, EPS_HI = 0.2, 0.28


@st.composite
def grpo_batches(draw):
    """logp, old_logp, ref_logp (B, T), advantages (B,), a mask whose rows may be all 0 (a masked
    truncated completion) while the batch keeps a token; ρ away from the clip's kinks."""
    B, T = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    logp = draw(arrays((B, T), min_value=-3, max_value=-0.05))
    old = logp + draw(arrays((B, T), min_value=-0.4, max_value=0.4))
    ref = logp + draw(arrays((B, T), min_value=-1, max_value=1))
    A = draw(arrays((B,), away_from=[0.0]))
    mask = np.zeros((B, T), dtype=bool)                                  # the losses' ``keep``
    for b in range(B):
        start, n = draw(st.integers(0, T - 1)), draw(st.integers(0, T))
        mask[b, start:start + n] = True
    assume(mask.sum() >= 1)
    rho = np.exp(logp - old)
    assume(np.abs(rho - (1 - EPS_LO)).min() > 1e-3 and np.abs(rho - (1 + EPS_HI)).min() > 1e-3)
    return logp, old, ref, A, mask


@given(grpo_batches(), st.sampled_from(["grpo", "bnpo", "dapo", "dr_grpo"]),
       st.sampled_from([0.0, 0.04, 0.5]), st.booleans())
def test_grpo_loss_value_and_gradient_are_trls(batch, loss_type, beta, bias_correction):
    logp, old, ref, A, mask = batch
    max_len = logp.shape[1] + 2
    kw = dict(beta=beta, epsilon_low=EPS_LO, epsilon_high=EPS_HI, loss_type=loss_type,
              max_completion_length=max_len, use_bias_correction_kl=bias_correction)
    lp = mr.tensor(logp, requires_grad=True)
    loss, metrics = grpo_loss(lp, old, ref, A, mask, **kw)
    loss.backward()

    def reference(x):
        return trl_loss(x, old, ref, A, mask, beta, EPS_LO, EPS_HI, loss_type, max_len, bias_correction)

    assert loss.item() == pytest.approx(reference(logp), rel=1e-12, abs=1e-14)
    np.testing.assert_allclose(lp.grad, numeric_grad(reference, logp), rtol=1e-6, atol=1e-8)
    assert mr.gradcheck(lambda x: grpo_loss(x, old, ref, A, mask, **kw)[0], [logp])

    rho, m = np.exp(logp - old), mask == 1
    low, high = (rho < 1 - EPS_LO) & (A[:, None] < 0) & m, (rho > 1 + EPS_HI) & (A[:, None] > 0) & m
    assert metrics["clip_ratio/low_mean"] == pytest.approx(low.sum() / m.sum())
    assert metrics["clip_ratio/high_mean"] == pytest.approx(high.sum() / m.sum())
    assert metrics["clip_ratio/region_mean"] == pytest.approx((low | high).sum() / m.sum())
    if beta > 0:
        kl = np.exp(ref - logp) - (ref - logp) - 1
        kl = kl * rho if bias_correction else kl
        assert metrics["kl"] == pytest.approx(kl[m].mean(), rel=1e-10)
    else:
        assert "kl" not in metrics


@given(grpo_batches())
def test_the_token_aggregations_are_their_formulas(batch):
    per_token, _, _, _, mask = batch
    B, T = mask.shape
    lengths = np.maximum(mask.sum(1), 1)
    expected = {"grpo": ((per_token * mask).sum(1) / lengths).mean(),
                "bnpo": (per_token * mask).sum() / mask.sum(),
                "dapo": (per_token * mask).sum() / mask.sum(),
                "dr_grpo": (per_token * mask).sum() / (B * 7),
                "sequence": (per_token * mask).sum(1).mean()}
    for loss_type, value in expected.items():
        got = aggregate_tokens(mr.tensor(per_token), mask, loss_type, max_completion_length=7)
        assert got.item() == pytest.approx(value, rel=1e-12)
        assert mr.gradcheck(lambda x: aggregate_tokens(x, mask, loss_type, 7), [per_token])


def test_grpo_weighs_a_long_sequences_tokens_less_and_dr_grpo_does_not():
    """Two sequences of 1 and 4 tokens, the same loss on each token: per token, "grpo" gives the
    short one 4 times the gradient of the long one; "dr_grpo" and "sequence" give both the same."""
    mask = np.array([[1, 0, 0, 0], [1, 1, 1, 1]]) == 1
    for loss_type, ratio in [("grpo", 4.0), ("dr_grpo", 1.0), ("sequence", 1.0), ("bnpo", 1.0)]:
        x = mr.tensor(np.ones((2, 4)), requires_grad=True)
        aggregate_tokens(x, mask, loss_type, max_completion_length=4).backward()
        assert x.grad[0, 0] / x.grad[1, 0] == pytest.approx(ratio)


def test_on_policy_grpo_with_beta_0_is_reinforce_with_group_advantages():
    """μ = 1: old_logp = logp, so ρ = 1, no clip, and ∇L = -(1/B) Σ_i A_i ∇(mean_t log p_θ)."""
    rng = np.random.default_rng(0)
    logp = -rng.random((4, 3))
    mask = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]]) == 1
    A = group_advantages(np.array([1.0, 2.0, 0.0, 3.0]), 2)
    lp = mr.tensor(logp, requires_grad=True)
    loss, metrics = grpo_loss(lp, logp, logp, A, mask)
    loss.backward()
    np.testing.assert_allclose(lp.grad, -A[:, None] * mask / mask.sum(1, keepdims=True) / 4,
                               rtol=1e-12)
    assert metrics["clip_ratio/region_mean"] == 0


def test_grpo_loss_refuses_bad_input():
    lp = mr.tensor(np.zeros((2, 3)))
    keep = np.ones((2, 3), bool)
    args = (lp, np.zeros((2, 3)), np.zeros((2, 3)), np.ones(2), keep)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(*args, loss_type="gspo")
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(*args, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="beta"):
        grpo_loss(*args, beta=-0.1)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(lp, np.zeros((2, 3)), np.zeros((2, 3)), np.ones((2, 3)), keep)
    with pytest.raises(ValueError, match="loss_type"):
        aggregate_tokens(lp, keep, "token")
    with pytest.raises(ValueError, match="max_completion_length"):
        aggregate_tokens(lp, keep, "dr_grpo")
