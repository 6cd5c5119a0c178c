"""The losses: known values, gradients against finite differences, and the gradients that are meant
*not* to be the total derivative (REINFORCE's constant reward)."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minirlhf as mr
import minirlhf.functional as F
from minirlhf.logprobs import logprobs_from_logits
from minirlhf.losses import (bt_loss, dpo_loss, kl_k1, kl_k2, kl_k3, kl_per_sequence,
                             ranking_to_pairs, reinforce_kl_loss, sft_loss)
from minirlhf.testing import arrays

LOG2 = math.log(2)


def vectors(n=None, **kw):
    """float64 vectors of one length n (drawn when not given)."""
    size = st.integers(1, 6) if n is None else st.just(n)
    return size.flatmap(lambda k: arrays((k,), **kw))


@st.composite
def vector_tuples(draw, count, **kw):
    n = draw(st.integers(1, 6))
    return tuple(draw(arrays((n,), **kw)) for _ in range(count))


def logsigmoid(x):
    return -np.logaddexp(0, -x)


# ===================================================================================================
# sft_loss


@st.composite
def sft_batches(draw):
    B, T, V = draw(st.integers(1, 3)), draw(st.integers(2, 5)), draw(st.integers(2, 4))
    z = draw(arrays((B, T, V)))
    ids = draw(st.lists(st.integers(0, V - 1), min_size=B * T, max_size=B * T))
    ids = np.array(ids).reshape(B, T)
    mask = np.zeros((B, T))
    for b in range(B):
        mask[b, draw(st.integers(1, T - 1)):] = 1
    return z, ids, mask


@given(sft_batches())
def test_sft_loss_equals_numpy_reference(batch):
    z, ids, mask = batch
    logp = z - z.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = [-logp[b, t - 1, ids[b, t]] for b in range(ids.shape[0]) for t in range(1, ids.shape[1])
           if mask[b, t]]
    assert sft_loss(mr.tensor(z), ids, mask).item() == pytest.approx(np.mean(nll), rel=1e-12)


@given(sft_batches())
def test_sft_loss_is_the_token_mean_of_sequence_logprobs(batch):
    z, ids, mask = batch
    per_token, _ = logprobs_from_logits(mr.tensor(z), ids, mask)
    expected = -per_token.numpy().sum() / mask.sum()
    assert sft_loss(mr.tensor(z), ids, mask).item() == pytest.approx(expected, rel=1e-12)


@given(sft_batches())
def test_sft_loss_gradcheck(batch):
    z, ids, mask = batch
    assert mr.gradcheck(lambda z: sft_loss(z, ids, mask), [z])


def test_sft_loss_ignores_prompt_targets():
    rng = np.random.default_rng(0)
    z = mr.tensor(rng.standard_normal((1, 4, 3)))
    mask = np.array([[0, 0, 1, 1]])
    a = sft_loss(z, np.array([[0, 1, 2, 0]]), mask).item()
    b = sft_loss(z, np.array([[2, 2, 2, 0]]), mask).item()             # only the prompt changed
    assert a == b


def test_sft_loss_refuses_bad_masks():
    z = mr.tensor(np.zeros((1, 3, 2)))
    with pytest.raises(ValueError, match="no completion tokens"):
        sft_loss(z, np.zeros((1, 3), dtype=int), np.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"\[:, 0\]"):
        sft_loss(z, np.zeros((1, 3), dtype=int), np.ones((1, 3)))


# ===================================================================================================
# bt_loss and rankings


@given(vectors())
def test_bt_loss_of_equal_rewards_is_log_2(r):
    loss, metrics = bt_loss(mr.tensor(r), mr.tensor(r.copy()))
    assert loss.item() == pytest.approx(LOG2, rel=1e-12)
    assert metrics == {"accuracy": 0.0, "margin": 0.0}


@given(vector_tuples(2))
def test_bt_loss_value_and_gradcheck(rs):
    rw, rl = rs
    loss, _ = bt_loss(mr.tensor(rw), mr.tensor(rl))
    assert loss.item() == pytest.approx(-logsigmoid(rw - rl).mean(), rel=1e-10)
    assert mr.gradcheck(lambda a, b: bt_loss(a, b)[0], [rw, rl])


def test_bt_loss_metrics_and_margin_on_a_hand_example():
    rw, rl = mr.tensor([2.0, 0.0, 1.0, 3.0]), mr.tensor([1.0, 1.0, 1.0, 0.0])
    loss, metrics = bt_loss(rw, rl)
    assert metrics["accuracy"] == 0.5                                   # a tie is not a win
    assert metrics["margin"] == pytest.approx(0.75)
    loss_m, metrics_m = bt_loss(rw, rl, margin=1.0)
    expected = -logsigmoid(np.array([1.0, -1.0, 0.0, 3.0]) - 1.0).mean()
    assert loss_m.item() == pytest.approx(expected, rel=1e-6)
    assert metrics_m == metrics                                         # metrics ignore the margin
    per_pair, _ = bt_loss(rw, rl, margin=np.array([0.0, 0.0, 0.0, 1.0]))
    assert per_pair.item() == pytest.approx(
        -logsigmoid(np.array([1.0, -1.0, 0.0, 2.0])).mean(), rel=1e-6)


@pytest.mark.parametrize("K", [1, 2, 3, 4, 7])
def test_ranking_to_pairs_gives_every_ordered_pair_once(K):
    pairs = ranking_to_pairs([f"r{i}" for i in range(K)])
    assert len(pairs) == K * (K - 1) // 2
    assert len(set(pairs)) == len(pairs)
    assert all(int(w[1:]) < int(l[1:]) for w, l in pairs)               # better first


# ===================================================================================================
# KL estimators


@given(vector_tuples(2))
def test_kl_estimators_on_arrays_and_tensors_agree(lp):
    logp, ref = lp
    for k in (kl_k1, kl_k2, kl_k3):
        a = k(logp, ref)
        t = k(mr.tensor(logp), ref).numpy()
        assert isinstance(a, np.ndarray)
        np.testing.assert_allclose(t, a, rtol=1e-12, atol=1e-15)
    lr = ref - logp
    np.testing.assert_allclose(kl_k1(logp, ref), -lr, rtol=1e-12)
    np.testing.assert_allclose(kl_k2(logp, ref), 0.5 * lr ** 2, rtol=1e-12)
    np.testing.assert_allclose(kl_k3(logp, ref), np.exp(lr) - 1 - lr, rtol=1e-9, atol=1e-15)


@given(vector_tuples(2))
def test_kl_estimators_gradcheck(lp):
    for k in (kl_k1, kl_k2, kl_k3):
        assert mr.gradcheck(k, list(lp))


def test_kl_per_sequence_sums_over_the_mask():
    logp = np.array([[0.0, -1.0, -2.0, -0.5], [0.0, -0.3, -0.1, -4.0]])
    ref = np.array([[0.0, -1.5, -1.0, -9.0], [0.0, -0.2, -0.9, -1.0]])
    mask = np.array([[0, 1, 1, 0], [0, 1, 1, 1]]) == 1                   # the completion tokens
    for name, k in (("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)):
        expected = (k(logp, ref) * mask).sum(axis=1)
        np.testing.assert_allclose(kl_per_sequence(logp, ref, mask, name), expected, rtol=1e-12)
        t = kl_per_sequence(mr.tensor(logp, requires_grad=True), ref, mask, name)
        np.testing.assert_allclose(t.numpy(), expected, rtol=1e-12)
    with pytest.raises(ValueError, match="estimator"):
        kl_per_sequence(logp, ref, mask, "k4")


# ===================================================================================================
# REINFORCE with KL


def test_reinforce_gradient_is_minus_mean_of_shaped_reward_times_score():
    # with logp as the leaf, ∂L/∂logp_i = -(R̂_i - b_i)/B and R̂ = R - β(logp - ref) is a constant
    logp = np.array([-1.0, -2.0, -0.5, -3.0])
    ref = np.array([-1.2, -1.0, -0.7, -2.0])
    R = np.array([1.0, 0.0, 2.0, -1.0])
    beta = 0.3
    shaped = R - beta * (logp - ref)
    x = mr.tensor(logp, requires_grad=True)
    loss, metrics = reinforce_kl_loss(x, ref, R, beta, baseline="none")
    loss.backward()
    np.testing.assert_allclose(x.grad, -shaped / 4, rtol=1e-12)
    assert loss.item() == pytest.approx(-(shaped * logp).mean(), rel=1e-12)
    assert metrics["reward"] == pytest.approx(0.5)
    assert metrics["kl"] == pytest.approx((logp - ref).mean())
    assert metrics["reward_with_kl"] == pytest.approx(shaped.mean())


def test_reinforce_gradient_through_a_model_is_the_score_function_estimator():
    # -∇θ L = mean[(R̂ - b)·∇θ log p_θ(y)], each ∇θ log p_θ(y) computed on its own
    rng = np.random.default_rng(1)
    W = mr.tensor(rng.standard_normal((3, 3)), requires_grad=True)
    ids = rng.integers(0, 3, (4, 4))
    mask = np.array([[0, 1, 1, 1]] * 4)
    R, ref = rng.standard_normal(4), rng.standard_normal(4) - 3
    _, logp = logprobs_from_logits(F.embedding(ids, W), ids, mask)
    loss, _ = reinforce_kl_loss(logp, ref, R, 0.5, baseline="mean")
    loss.backward()
    shaped = R - 0.5 * (logp.numpy() - ref)
    adv = shaped - shaped.mean()
    expected = np.zeros((3, 3))
    for i in range(4):
        Wi = mr.tensor(W.numpy(), requires_grad=True)
        row = slice(i, i + 1)
        logprobs_from_logits(F.embedding(ids[row], Wi), ids[row], mask[row])[1].sum().backward()
        expected += adv[i] * Wi.grad / 4
    np.testing.assert_allclose(-W.grad, expected, rtol=1e-10, atol=1e-12)


def test_baselines_mean_and_leave_one_out():
    logp = mr.tensor(np.zeros(5), requires_grad=True)
    R = np.array([1.0, 2.0, 3.0, 10.0, 20.0])
    group = np.array([7, 7, 7, 3, 3])
    for baseline, group_, b in [
        ("mean", None, np.full(5, 7.2)),
        ("loo", None, (36 - R) / 4),
        ("mean", group, np.array([2.0, 2.0, 2.0, 15.0, 15.0])),
        ("loo", group, np.array([2.5, 2.0, 1.5, 20.0, 10.0])),          # never the sample itself
    ]:
        logp.grad = None
        loss, m = reinforce_kl_loss(logp, np.zeros(5), R, 0.0, baseline=baseline, group=group_)
        loss.backward()
        np.testing.assert_allclose(-5 * logp.grad, R - b, rtol=1e-12, err_msg=f"{baseline} {group_}")
        assert m["advantage/mean"] == pytest.approx((R - b).mean())


def test_leave_one_out_needs_two_samples_per_group():
    with pytest.raises(ValueError, match="at least 2"):
        reinforce_kl_loss(mr.tensor(np.zeros(3), requires_grad=True), np.zeros(3), np.ones(3), 0.1,
                          baseline="loo", group=[0, 0, 1])


def test_reinforce_beta_zero_is_plain_reinforce_and_negative_beta_is_an_error():
    x = mr.tensor(np.array([-1.0, -2.0]), requires_grad=True)
    loss, _ = reinforce_kl_loss(x, np.array([5.0, -5.0]), np.array([1.0, 3.0]), 0.0, baseline="none")
    assert loss.item() == pytest.approx(-(1.0 * -1.0 + 3.0 * -2.0) / 2)
    for beta in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="beta"):
            reinforce_kl_loss(x, np.zeros(2), np.ones(2), beta)
    with pytest.raises(ValueError, match="baseline"):
        reinforce_kl_loss(x, np.zeros(2), np.ones(2), 0.1, baseline="median")
    with pytest.raises(ValueError, match="one shape"):
        reinforce_kl_loss(x, np.zeros(3), np.ones(2), 0.1)


# ===================================================================================================
# DPO


@given(vectors(), vectors(), st.floats(0.01, 10.0), st.sampled_from([0.0, 0.1, 0.5]))
def test_dpo_loss_is_log_2_when_the_policy_is_the_reference(a, b, beta, eps):
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    loss, metrics = dpo_loss(mr.tensor(a), mr.tensor(b), a, b, beta=beta, label_smoothing=eps)
    assert loss.item() == pytest.approx(LOG2, rel=1e-12)
    assert metrics["rewards/margins"] == 0.0 and metrics["rewards/accuracies"] == 0.0


@given(vector_tuples(4), st.floats(0.05, 3.0), st.sampled_from([0.0, 0.2]))
def test_dpo_loss_value_and_gradcheck(v, beta, eps):
    pw, pl, rw, rl = v
    h = (pw - rw) - (pl - rl)
    loss, _ = dpo_loss(mr.tensor(pw), mr.tensor(pl), rw, rl, beta=beta, label_smoothing=eps)
    expected = -((1 - eps) * logsigmoid(beta * h) + eps * logsigmoid(-beta * h)).mean()
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    assert mr.gradcheck(lambda a, b: dpo_loss(a, b, rw, rl, beta=beta, label_smoothing=eps)[0],
                        [pw, pl])


@given(vector_tuples(4), st.floats(0.05, 3.0))
def test_ipo_loss_value_and_gradcheck(v, beta):
    pw, pl, rw, rl = v
    h = (pw - rw) - (pl - rl)
    loss, _ = dpo_loss(mr.tensor(pw), mr.tensor(pl), rw, rl, beta=beta, loss_type="ipo")
    assert loss.item() == pytest.approx(((h - 1 / (2 * beta)) ** 2).mean(), rel=1e-10)
    assert mr.gradcheck(lambda a, b: dpo_loss(a, b, rw, rl, beta=beta, loss_type="ipo")[0], [pw, pl])


def test_dpo_metrics_on_a_hand_example():
    pw, pl = mr.tensor([-1.0, -3.0]), mr.tensor([-2.0, -1.0])
    rw, rl = np.array([-2.0, -2.0]), np.array([-2.0, -2.0])
    loss, m = dpo_loss(pw, pl, rw, rl, beta=0.5)
    # chosen rewards 0.5·(1, -1), rejected 0.5·(0, 1)
    assert m["rewards/chosen"] == pytest.approx(0.0)
    assert m["rewards/rejected"] == pytest.approx(0.25)
    assert m["rewards/margins"] == pytest.approx(-0.25)
    assert m["rewards/accuracies"] == pytest.approx(0.5)
    assert m["logps/chosen"] == pytest.approx(-2.0)
    assert m["logps/rejected"] == pytest.approx(-1.5)
    assert loss.item() == pytest.approx(-(logsigmoid(0.5) + logsigmoid(-1.0)) / 2, rel=1e-6)


def test_dpo_gradient_matches_the_formula_and_skips_the_reference():
    # ∂L/∂log p_θ(y_w) = -β·σ(-β h)/B and ∂L/∂log p_θ(y_l) = +β·σ(-β h)/B
    pw = mr.tensor(np.array([-1.0, -2.0]), requires_grad=True)
    pl = mr.tensor(np.array([-1.5, -0.5]), requires_grad=True)
    rw = mr.tensor(np.array([-1.2, -1.0]), requires_grad=True)
    rl = mr.tensor(np.array([-1.0, -1.0]), requires_grad=True)
    beta = 0.7
    loss, _ = dpo_loss(pw, pl, rw, rl, beta=beta)
    loss.backward()
    h = (pw.numpy() - rw.numpy()) - (pl.numpy() - rl.numpy())
    s = 1 / (1 + np.exp(beta * h))
    np.testing.assert_allclose(pw.grad, -beta * s / 2, rtol=1e-12)
    np.testing.assert_allclose(pl.grad, beta * s / 2, rtol=1e-12)
    assert rw.grad is None and rl.grad is None                          # the reference is frozen


@pytest.mark.parametrize("beta", [0.0, -1.0, float("nan")])
def test_beta_must_be_positive(beta):
    x = mr.tensor(np.zeros(2), requires_grad=True)
    with pytest.raises(ValueError, match="beta > 0"):
        dpo_loss(x, x, np.zeros(2), np.zeros(2), beta=beta)


def test_dpo_refuses_bad_options():
    x = mr.tensor(np.zeros(2))
    z = np.zeros(2)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, z, z, label_smoothing=0.6)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, z, z, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(x, x, z, z, loss_type="hinge")
    with pytest.raises(ValueError, match="one shape"):
        dpo_loss(x, x, np.zeros(3), z)


def test_losses_keep_float32():
    x = mr.tensor(np.array([-1.0, -2.0], dtype=np.float32), requires_grad=True)
    z = np.zeros(2)                                                      # float64 constants
    assert dpo_loss(x, x, z, z)[0].dtype == np.float32
    assert reinforce_kl_loss(x, z, z, 0.1)[0].dtype == np.float32
    assert bt_loss(x, x)[0].dtype == np.float32
    assert kl_k3(x, z).dtype == np.float32
