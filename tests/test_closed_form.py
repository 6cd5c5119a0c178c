"""The closed form is our proof: on a problem small enough to enumerate (2 prompts, 3 tokens,
completions of length 3: 27 per prompt) the optimum of RLHF is known exactly,

    p*(y|x) = p_ref(y|x) · exp(R(y|x)/β) / Z(x),

and the library's own losses, trained the way the trainers train them, must arrive there.

The convergence tests (a)-(d) train a `TabularPolicy` (one row of logits per prompt and completion
prefix: it can represent p* exactly and trains in milliseconds); the same `sequence_logprobs`,
`reinforce_kl_loss` and `dpo_loss` train a tiny GPT in the last test, which only checks that it
moves towards p* (it reaches the same tolerances in ~1500 steps, minutes rather than seconds:
examples/closed_form.py --model gpt). β = 2 rather than 1, so that a β where 1/β belongs shows.
"""

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minirlhf as mr
from minirlhf.closed_form import (TabularPolicy, bradley_terry_pairs, centered_pearson,
                                  completion_index, enumerate_completions, exact_gradient,
                                  exact_logprobs, exact_objective, exact_policy,
                                  exact_token_logprobs, flat_gradient, kl, make_problem,
                                  make_sequences, optimal_policy, reinforce_gradients,
                                  sample_completions, train_dpo, train_reinforce,
                                  train_reward_table)
from minirlhf.closed_form import TabularValue, train_ppo
from minirlhf.logprobs import sequence_logprobs
from minirlhf.losses import dpo_loss, kl_k1, kl_k2, kl_k3, kl_per_sequence

PROBLEM = make_problem(n_prompts=2, n_tokens=3, length=3, beta=2.0, reward_scale=2.0, seed=0)
PAIRS_PER_PROMPT = 10_000


def reference():
    """The frozen reference; the policy starts as an identical copy, as after SFT."""
    return TabularPolicy(PROBLEM.prompts, PROBLEM.n_tokens, PROBLEM.length, init_std=0.5, seed=1)


@pytest.fixture(scope="module")
def exact():
    ref = reference()
    p_ref = exact_policy(ref, PROBLEM.prompts, PROBLEM.completions)
    p_star = optimal_policy(p_ref, PROBLEM.R, PROBLEM.beta)
    pairs = bradley_terry_pairs(p_ref, PROBLEM.R, PAIRS_PER_PROMPT, np.random.default_rng(0))
    return {"ref": ref, "p_ref": p_ref, "p_star": p_star, "pairs": pairs}


def kl_to_optimum(policy, p_star):
    return kl(exact_policy(policy, PROBLEM.prompts, PROBLEM.completions), p_star)


# ===================================================================================================
# the exact tools


def test_completions_are_enumerated_in_order():
    ys = enumerate_completions(3, 3)
    assert ys.shape == (27, 3)
    assert len({tuple(y) for y in ys}) == 27
    np.testing.assert_array_equal(completion_index(ys, 3), np.arange(27))
    np.testing.assert_array_equal(ys[5], [0, 1, 2])


def test_exact_policy_is_a_distribution_and_matches_the_chain_rule(exact):
    p = exact["p_ref"]
    assert p.shape == (2, 27) and np.all(p > 0)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-12)
    # p(y|x) = Π_t p(y_t | x, y_<t), read token by token from the logits
    ref = exact["ref"]
    ids, _ = make_sequences(PROBLEM.prompts[[1]], PROBLEM.completions[[14]])
    z = ref(ids).numpy()[0]
    probs = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
    y = ids[0]
    assert p[1, 14] == pytest.approx(np.prod([probs[t - 1, y[t]] for t in (1, 2, 3)]), rel=1e-12)


def test_exact_token_logprobs_are_the_terms_of_exact_logprobs(exact):
    tokens = exact_token_logprobs(exact["ref"], PROBLEM.prompts, PROBLEM.completions).numpy()
    assert tokens.shape == (2, 27, 3)
    table = exact_logprobs(exact["ref"], PROBLEM.prompts, PROBLEM.completions).numpy()
    np.testing.assert_array_equal(tokens.sum(-1), table)                 # 4 tokens: one sum order
    # p(y_0 | x) does not depend on the rest of y: the first token's term repeats in blocks of 9
    np.testing.assert_array_equal(tokens[:, :, 0], np.repeat(tokens[:, ::9, 0], 9, axis=1))


def test_flat_gradient_is_every_parameters_gradient_in_order_and_leaves_grad_empty():
    a, b = mr.tensor(np.ones((2, 2)), requires_grad=True), mr.tensor(np.ones(3), requires_grad=True)
    b.grad = np.full(3, 7.0)                                             # stale: cleared first
    g = flat_gradient([a, b], lambda: (a * 3.0).sum() + (b * b).sum())
    np.testing.assert_array_equal(g, [3.0, 3.0, 3.0, 3.0, 2.0, 2.0, 2.0])
    assert g.dtype == np.float64 and a.grad is None and b.grad is None
    unused = mr.tensor(np.ones(2), requires_grad=True)
    np.testing.assert_array_equal(flat_gradient([unused, b], lambda: b.sum()), [0, 0, 1, 1, 1])


def test_sampling_frequencies_match_the_exact_policy(exact):
    n = 20_000
    prompt_idx, ys = sample_completions(exact["ref"], PROBLEM.prompts, n, PROBLEM.length,
                                        np.random.default_rng(1))
    for x in range(2):
        counts = np.bincount(completion_index(ys[prompt_idx == x], 3), minlength=27)
        p = exact["p_ref"][x]
        se = np.sqrt(p * (1 - p) / n)
        assert np.all(np.abs(counts / n - p) <= 4.5 * se)


def test_optimal_policy_maximises_the_kl_regularised_objective(exact):
    # J(p) = E_p[R] - β·KL(p ‖ p_ref) = β·log Z - β·KL(p ‖ p*) <= J(p*) = β·log Z
    p_ref, p_star, beta = exact["p_ref"], exact["p_star"], PROBLEM.beta
    log_Z = np.log((p_ref * np.exp(PROBLEM.R / beta)).sum(axis=1))

    def J(p):
        return (p * PROBLEM.R).sum(axis=1) - beta * kl(p, p_ref)

    np.testing.assert_allclose(J(p_star), beta * log_Z, rtol=1e-12)
    rng = np.random.default_rng(2)
    for _ in range(20):
        p = rng.dirichlet(np.ones(27), size=2)
        np.testing.assert_allclose(J(p), beta * log_Z - beta * kl(p, p_star), rtol=1e-10)
        assert np.all(J(p) < J(p_star))
    # and the library's autograd objective agrees with the NumPy one
    logp = exact_logprobs(exact["ref"], PROBLEM.prompts, PROBLEM.completions)
    J_t = exact_objective(logp, np.log(p_ref), PROBLEM.R, beta)
    assert J_t.item() == pytest.approx(J(p_ref).mean(), rel=1e-12)


def test_optimal_policy_is_stable_for_large_rewards():
    p = optimal_policy(np.full((1, 3), 1 / 3), np.array([[1000.0, 999.0, -1000.0]]), 0.01)
    assert np.all(np.isfinite(p)) and p[0, 0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="beta"):
        optimal_policy(np.full((1, 3), 1 / 3), np.zeros((1, 3)), 0.0)


def test_bradley_terry_pairs_follow_the_sigmoid_of_the_reward_gap(exact):
    prompt, chosen, rejected = exact["pairs"]
    assert len(prompt) == 2 * PAIRS_PER_PROMPT and np.all(chosen != rejected)
    # P(the higher-reward completion wins) predicted vs observed
    R = PROBLEM.R[prompt, :]
    rc, rr = R[np.arange(len(prompt)), chosen], R[np.arange(len(prompt)), rejected]
    better_won = (rc > rr).mean()
    predicted = (1 / (1 + np.exp(-np.abs(rc - rr)))).mean()
    assert better_won == pytest.approx(predicted, abs=0.015)


# ===================================================================================================
# (a) REINFORCE with KL, by sampling


def test_a_reinforce_with_kl_by_sampling_reaches_the_optimum(exact):
    policy = reference()
    start = kl_to_optimum(policy, exact["p_star"])
    train_reinforce(policy, exact["ref"], PROBLEM, steps=300, n_per_prompt=32, lr=0.05,
                    baseline="loo", seed=0)
    end = kl_to_optimum(policy, exact["p_star"])
    assert np.all(start > 0.25)
    assert np.all(end <= 0.01), f"KL(p_θ ‖ p*) per prompt: {end}"


# ===================================================================================================
# (b) DPO on Bradley-Terry preference pairs


def test_a_ppo_with_k1_in_the_reward_reaches_the_optimum_and_its_critic_the_optimal_value(exact):
    """PPO as InstructGPT ran it (per-token -β·k1 reward, GAE λ = 0.95, whitened advantages, 4
    epochs x 2 minibatches of the clipped surrogate and value loss) arrives at the same p*; its
    value of the empty prefix is then max_p J = β·log Z(x), the value of the optimum."""
    policy = reference()
    value = TabularValue(PROBLEM.prompts, PROBLEM.n_tokens, PROBLEM.length)
    train_ppo(policy, exact["ref"], value, PROBLEM, steps=150, n_per_prompt=32, lr=0.05,
              ppo_epochs=4, num_minibatches=2, lam=0.95, seed=0)
    end = kl_to_optimum(policy, exact["p_star"])
    assert np.all(end <= 0.01), f"KL(p_θ ‖ p*) per prompt: {end}"
    ids, _ = make_sequences(PROBLEM.prompts, PROBLEM.completions[:len(PROBLEM.prompts)])
    log_Z = np.log((exact["p_ref"] * np.exp(PROBLEM.R / PROBLEM.beta)).sum(axis=1))
    np.testing.assert_allclose(value(ids).numpy()[:, 1], PROBLEM.beta * log_Z, atol=0.05)


def test_tabular_value_reads_one_value_per_prefix_before_the_token():
    value = TabularValue(PROBLEM.prompts, PROBLEM.n_tokens, PROBLEM.length)
    value.weight.data[:] = np.arange(value.weight.shape[0])[:, None]
    ids, _ = make_sequences([[0], [1]], [[2, 1, 0], [2, 1, 0]])
    v = value(ids).numpy()
    n = value.n_prefixes                                                 # 13 prefixes per prompt
    # token 1 (y_0) has the empty prefix; token 2 the prefix (2,); token 3 the prefix (2, 1)
    np.testing.assert_array_equal(v, [[0, 0, 1 + 2, 4 + 2 * 3 + 1], [0, n, n + 3, n + 4 + 7]])


def test_b_dpo_on_bradley_terry_pairs_reaches_the_optimum(exact):
    policy = reference()
    train_dpo(policy, exact["ref"], PROBLEM, exact["pairs"], steps=200, lr=0.05)
    end = kl_to_optimum(policy, exact["p_star"])
    assert np.all(end <= 0.02), f"KL(p_θ ‖ p*) per prompt: {end}"


# ===================================================================================================
# (c) a Bradley-Terry reward model recovers R up to a constant per prompt


def test_c_bradley_terry_reward_model_recovers_the_reward(exact):
    r = train_reward_table(PROBLEM, exact["pairs"], steps=200, lr=0.1)
    assert centered_pearson(r, PROBLEM.R) >= 0.98
    # only differences are identified: the raw table need not match R's per-prompt offsets
    assert centered_pearson(r + np.array([[5.0], [-3.0]]), PROBLEM.R) == pytest.approx(
        centered_pearson(r, PROBLEM.R))


# ===================================================================================================
# (d) REINFORCE is an unbiased estimator of the exact gradient


@pytest.fixture(scope="module")
def gradients(exact):
    """The exact ∇J and 400 independent REINFORCE estimates, at a policy away from the reference."""
    policy = TabularPolicy(PROBLEM.prompts, 3, 3, init_std=0.5, seed=2)
    g = exact_gradient(policy, exact["ref"], PROBLEM)
    rows = {b: reinforce_gradients(policy, exact["ref"], PROBLEM, n_batches=400, n_per_prompt=8,
                                   seed=3, baseline=b) for b in ("none", "loo")}
    # the same samples with the KL term dropped from the shaped reward (β = 0): a biased estimator
    rows["no_kl"] = reinforce_gradients(policy, exact["ref"], replace(PROBLEM, beta=0.0), n_batches=400,
                                        n_per_prompt=8, seed=3, baseline="none")
    return g, rows


def z_scores(rows, exact_value):
    mean = rows.mean(axis=0)
    se = rows.std(axis=0, ddof=1) / np.sqrt(len(rows))
    return np.abs(mean - exact_value) / np.maximum(se, 1e-12)


@pytest.mark.parametrize("baseline", ["none", "loo"])
def test_d_reinforce_gradient_is_unbiased_for_every_parameter(gradients, baseline):
    g, rows = gradients
    assert np.abs(g).max() > 0.05                                        # a gradient worth testing
    assert z_scores(rows[baseline], g).max() <= 4.0


def test_d_reinforce_gradient_is_unbiased_along_random_directions(gradients):
    g, rows = gradients
    directions = np.random.default_rng(4).standard_normal((5, g.size))
    assert z_scores(rows["none"] @ directions.T, directions @ g).max() <= 4.0


def test_d_the_test_detects_a_missing_kl_term(gradients):
    g, rows = gradients
    assert z_scores(rows["no_kl"], g).max() > 10


def test_d_leave_one_out_ignores_a_reward_offset_that_plain_reinforce_suffers(exact, gradients):
    # adding a constant to R changes neither ∇J nor the leave-one-out estimates (the constant
    # cancels in R̂ - b), but it inflates the variance of the estimator without a baseline
    _, rows = gradients
    policy = TabularPolicy(PROBLEM.prompts, 3, 3, init_std=0.5, seed=2)
    shifted = replace(PROBLEM, R=PROBLEM.R + 10.0)
    loo = reinforce_gradients(policy, exact["ref"], shifted, 400, 8, seed=3, baseline="loo")
    none = reinforce_gradients(policy, exact["ref"], shifted, 400, 8, seed=3, baseline="none")
    np.testing.assert_allclose(loo, rows["loo"], rtol=1e-9, atol=1e-12)
    assert none.var(axis=0).sum() > 10 * rows["none"].var(axis=0).sum()


# ===================================================================================================
# (e) exact identities


def test_e_dpo_loss_is_log_2_when_the_policy_is_the_reference(exact):
    prompt, chosen, rejected = (a[:64] for a in exact["pairs"])
    table = exact_logprobs(reference(), PROBLEM.prompts, PROBLEM.completions)
    ref_table = exact_logprobs(exact["ref"], PROBLEM.prompts, PROBLEM.completions).numpy()
    for beta in (0.01, 0.1, 2.0, 50.0):
        loss, metrics = dpo_loss(table[prompt, chosen], table[prompt, rejected],
                                 ref_table[prompt, chosen], ref_table[prompt, rejected], beta=beta)
        assert loss.item() == pytest.approx(np.log(2), rel=1e-12)
        assert metrics["rewards/margins"] == 0


def test_e_kl_estimators_are_zero_for_equal_policies(exact):
    _, ys = sample_completions(exact["ref"], PROBLEM.prompts, 8, 3, np.random.default_rng(5))
    ids, mask = make_sequences(np.repeat(PROBLEM.prompts, 8, axis=0), ys)
    per_token, _ = sequence_logprobs(reference(), ids, mask)
    ref_token, _ = sequence_logprobs(exact["ref"], ids, mask)
    for estimator in ("k1", "k2", "k3"):
        assert np.all(kl_per_sequence(per_token, ref_token.numpy(), mask != 0, estimator).numpy() == 0)


def test_e_k1_and_k3_are_unbiased_and_k2_is_not():
    rng = np.random.default_rng(6)
    p, q = rng.dirichlet(np.ones(6)), rng.dirichlet(np.ones(6))
    exact_kl = float(kl(p[None], q[None])[0])
    x = rng.choice(6, size=50_000, p=p)                                  # samples of p_θ = p
    logp, ref_logp = np.log(p[x]), np.log(q[x])
    for estimator in (kl_k1, kl_k3):
        k = estimator(logp, ref_logp)
        assert abs(k.mean() - exact_kl) <= 4 * k.std() / np.sqrt(len(k))
    k2 = kl_k2(logp, ref_logp)
    assert abs(k2.mean() - exact_kl) > 4 * k2.std() / np.sqrt(len(k2))  # biased for far-apart p, q
    assert kl_k3(logp, ref_logp).std() < kl_k1(logp, ref_logp).std()


log_probs = st.floats(-60.0, 0.0, allow_nan=False)


@given(st.lists(st.tuples(log_probs, log_probs), min_size=1, max_size=8),
       st.sampled_from([np.float32, np.float64]))
def test_e_k2_and_k3_are_never_negative(pairs, dtype):
    logp, ref = (np.array(v, dtype=dtype) for v in zip(*pairs))
    assert np.all(kl_k3(logp, ref) >= 0)
    assert np.all(kl_k3(mr.tensor(logp), ref).numpy() >= 0)
    assert np.all(kl_k2(logp, ref) >= 0)


@given(st.lists(log_probs, min_size=1, max_size=8))
def test_e_k3_is_never_negative_near_equal_policies(logp):
    logp = np.array(logp)
    for eps in (1e-12, 1e-9, 1e-6, -1e-9):
        assert np.all(kl_k3(logp, logp + eps) >= 0)
    assert np.all(kl_k1(logp, logp) == 0) and np.all(kl_k3(logp, logp) == 0)


# ===================================================================================================
# the same code trains a tiny GPT


def test_the_same_losses_move_a_tiny_gpt_towards_the_optimum():
    model_module = pytest.importorskip("minirlhf.model")
    cfg = model_module.GPTConfig(block_size=4, vocab_size=3, n_layer=1, n_head=2, n_embd=16,
                                 dtype="float64")
    ref = model_module.GPT(cfg, seed=1)
    p_ref = exact_policy(ref, PROBLEM.prompts, PROBLEM.completions)
    p_star = optimal_policy(p_ref, PROBLEM.R, PROBLEM.beta)
    start = kl(p_ref, p_star).mean()

    policy = model_module.GPT(cfg, seed=1)
    train_reinforce(policy, ref, PROBLEM, steps=60, n_per_prompt=16, lr=0.01, seed=0)
    assert kl_to_optimum(policy, p_star).mean() < 0.85 * start

    pairs = bradley_terry_pairs(p_ref, PROBLEM.R, 2000, np.random.default_rng(0))
    policy = model_module.GPT(cfg, seed=1)
    train_dpo(policy, ref, PROBLEM, pairs, steps=60, lr=0.01)
    assert kl_to_optimum(policy, p_star).mean() < 0.6 * start
