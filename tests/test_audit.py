"""The audit's identities (minirlhf.audit), exact by enumeration: which gradient each placement of
the KL follows, where GRPO's variants and IPO stop (their expected gradient vanishes at the optimum
of the objective the audit names, not at p*), and the bias and variance of REINFORCE's baselines."""

import numpy as np
import pytest

from minirlhf import audit
from minirlhf.audit import (KL_PLACEMENTS, TARGETS, audit_problem, estimator_moments, exact_policy,
                            grpo_expected_loss, kl_gradients, kl_problems, per_token_optimum,
                            set_policy)
from minirlhf.closed_form import (TabularPolicy, bradley_terry_pairs, exact_gradient, exact_logprobs,
                                  exact_token_logprobs, flat_gradient, kl, optimal_policy)
from minirlhf.losses import dpo_loss, reinforce_kl_loss
from minirlhf.tensor import no_grad

REVERSE, FORWARD, PER_TOKEN_REVERSE, PER_TOKEN_FORWARD = TARGETS
K1_LOSS, K2_LOSS, K3_LOSS, K3_RHO, K1_REWARD = KL_PLACEMENTS


@pytest.fixture(scope="module")
def placements():
    return {setting: kl_gradients(*args) for setting, args in kl_problems().items()}


def close(g, target):
    return audit.relative_error(g, target) < 1e-10


def test_k1_as_a_loss_has_mean_gradient_0(placements):
    for estimates, targets in placements.values():
        assert np.abs(estimates[K1_LOSS]).max() < 1e-14 * np.abs(targets[REVERSE]).max() + 1e-15


def test_per_token_k2_and_k3_rho_follow_the_reverse_kl_and_k3_the_forward_kl(placements):
    estimates, targets = placements["one token"]
    assert close(estimates[K2_LOSS], targets[REVERSE])
    assert close(estimates[K3_RHO], targets[REVERSE])
    assert close(estimates[K3_LOSS], targets[FORWARD])
    assert not close(estimates[K3_LOSS], targets[REVERSE])              # the two KLs differ here


def test_over_sequences_per_token_estimators_drop_the_future_tokens_kl(placements):
    estimates, targets = placements["sequence"]
    assert close(estimates[K2_LOSS], targets[PER_TOKEN_REVERSE])
    assert close(estimates[K3_RHO], targets[PER_TOKEN_REVERSE])
    assert close(estimates[K3_LOSS], targets[PER_TOKEN_FORWARD])
    for name in (K2_LOSS, K3_LOSS, K3_RHO):
        assert audit.relative_error(estimates[name], targets[REVERSE]) > 0.1


def test_only_k1_in_the_reward_gives_the_sequences_exact_gradient(placements):
    for estimates, targets in placements.values():
        assert close(estimates[K1_REWARD], targets[REVERSE])


# ===================================================================================================
# where the algorithms stop: their expected gradient is 0 at the optimum the audit names


@pytest.fixture(scope="module")
def toy():
    problem, ref = audit_problem()
    p_ref = exact_policy(ref, problem.prompts, problem.completions)
    with no_grad():
        ref_tok = exact_token_logprobs(ref, problem.prompts, problem.completions).numpy()
    return problem, ref, p_ref, ref_tok


def policy_at(problem, p):
    policy = TabularPolicy(problem.prompts, problem.n_tokens, problem.length, seed=5)
    return set_policy(policy, problem, p)


def grpo_gradient(problem, p, ref_tok, scale="none", bias_correction=False, G=4):
    policy = policy_at(problem, p)
    return flat_gradient(policy.parameters(), lambda: grpo_expected_loss(
        policy, problem, ref_tok, G, scale, bias_correction))


def test_set_policy_writes_a_table_exactly(toy):
    problem, _, p_ref, _ = toy
    p = optimal_policy(p_ref, problem.R, problem.beta)
    np.testing.assert_allclose(exact_policy(policy_at(problem, p), problem.prompts,
                                            problem.completions), p, rtol=1e-12)


def test_reinforce_stops_at_p_star(toy):
    problem, ref, p_ref, _ = toy
    p_star = optimal_policy(p_ref, problem.R, problem.beta)
    assert np.abs(exact_gradient(policy_at(problem, p_star), ref, problem)).max() < 1e-12


@pytest.mark.parametrize("bias_correction, divergence", [(False, "forward"), (True, "reverse")])
def test_grpo_with_k3_stops_at_the_per_token_optimum_with_beta_times_g_over_g_minus_1(
        toy, bias_correction, divergence):
    """k3 in the loss: forward KL per token; k3·ρ: reverse KL per token; both with β·G/(G-1),
    because the group mean includes the sample itself; and neither at p*."""
    problem, _, p_ref, ref_tok = toy
    G = 4
    p_claim = per_token_optimum(p_ref, problem.R, problem.beta, 3, 3, divergence, c=(G - 1) / G)
    at_claim = grpo_gradient(problem, p_claim, ref_tok, "none", bias_correction, G)
    assert np.abs(at_claim).max() < 1e-12
    p_star = optimal_policy(p_ref, problem.R, problem.beta)
    assert np.abs(grpo_gradient(problem, p_star, ref_tok, "none", bias_correction, G)).max() > 1e-3
    assert kl(p_claim, p_star).mean() > 0.01


def test_grpo_with_std_scaling_stops_at_its_own_rescaled_reward_optimum(toy):
    problem, _, p_ref, ref_tok = toy
    p = audit.grpo_group_fixed_point(p_ref, problem.R, problem.beta, 4, 3, 3)
    assert np.abs(grpo_gradient(problem, p, ref_tok, "group")).max() < 1e-9   # iterated to 1e-15 nats
    assert kl(p, optimal_policy(p_ref, problem.R, problem.beta)).mean() > 0.01


def test_grpo_fixed_point_refuses_to_return_an_unconverged_policy(toy):
    problem, _, p_ref, _ = toy
    with pytest.raises(RuntimeError, match="no fixed point after 2 iterations"):
        audit.grpo_group_fixed_point(p_ref, problem.R, problem.beta, 4, 3, 3, iterations=2)


def test_forward_kl_argmax_is_stationary_on_the_simplex():
    rng = np.random.default_rng(0)
    ref = rng.dirichlet(np.ones(5), size=3)
    s = rng.standard_normal((3, 5))
    q = audit._forward_kl_argmax(ref, s)
    np.testing.assert_allclose(q.sum(-1), 1, rtol=1e-14)
    lam = s + ref / q                                                    # s_a + ref_a/q_a = λ
    np.testing.assert_allclose(lam, lam[:, :1] * np.ones(5), rtol=1e-10)


def test_ipo_stops_at_its_pairs_least_squares_not_at_p_star(toy):
    problem, ref, p_ref, _ = toy
    pairs = bradley_terry_pairs(p_ref, problem.R, 300, np.random.default_rng(0))
    prompt, chosen, rejected = pairs
    p_ipo = audit.ipo_least_squares(problem, p_ref, pairs, problem.beta)
    policy = policy_at(problem, p_ipo)
    with no_grad():
        ref_table = exact_logprobs(ref, problem.prompts, problem.completions).numpy()

    def loss():
        table = exact_logprobs(policy, problem.prompts, problem.completions)
        return dpo_loss(table[prompt, chosen], table[prompt, rejected], ref_table[prompt, chosen],
                        ref_table[prompt, rejected], beta=problem.beta, loss_type="ipo")[0]

    assert np.abs(flat_gradient(policy.parameters(), loss)).max() < 1e-10
    assert kl(p_ipo, optimal_policy(p_ref, problem.R, problem.beta)).mean() > 0.1


# ===================================================================================================
# bias and variance of the estimators


@pytest.fixture(scope="module")
def moments():
    rows, _ = estimator_moments(group_sizes=(2, 3, 4))
    return {(n, b): (bias, cos, var) for n, b, bias, cos, var in rows}


@pytest.mark.parametrize("n", [2, 3, 4])
def test_the_mean_with_the_sample_shrinks_the_gradient_by_n_minus_1_over_n(moments, n):
    bias, cos, _ = moments[n, "mean"]
    assert bias == pytest.approx(1 / n, rel=1e-10) and cos == pytest.approx(1, abs=1e-12)
    assert moments[n, "none"][0] < 1e-12 and moments[n, "loo"][0] < 1e-12
    assert moments[n, "loo"][2] == pytest.approx((n / (n - 1)) ** 2 * moments[n, "mean"][2],
                                                 rel=1e-10)
    assert moments[n, "loo"][2] < moments[n, "none"][2]                # a baseline pays
    assert moments[n, "group-normalised"][1] < 1 - 1e-4                 # not even its direction


def test_group_estimates_are_minus_the_gradient_of_reinforce_kl_loss():
    """The vectorised estimates of the table are the library's loss on one group of samples."""
    problem, policy, ref = audit.estimator_problem()
    ys = problem.completions
    with no_grad():
        logp = exact_token_logprobs(policy, problem.prompts, ys).numpy().sum(-1)[0]
        ref_logp = exact_token_logprobs(ref, problem.prompts, ys).numpy().sum(-1)[0]
    params = policy.parameters()
    scores = np.stack([flat_gradient(params, lambda j=j: exact_token_logprobs(
        policy, problem.prompts, ys)[0, j].sum()) for j in range(len(logp))])
    group = np.array([[0, 4, 4, 7]])
    for baseline in ("none", "mean", "loo"):
        def loss():
            table = exact_token_logprobs(policy, problem.prompts, ys).sum(axis=2)[0]   # (N,)
            return reinforce_kl_loss(table[group[0]], ref_logp[group[0]], problem.R[0][group[0]],
                                     problem.beta, baseline=baseline)[0]
        shaped = problem.R[0] - problem.beta * (logp - ref_logp)
        np.testing.assert_allclose(audit.group_estimates(shaped, scores, group, baseline)[0],
                                   -flat_gradient(params, loss), rtol=1e-10, atol=1e-14)


# ===================================================================================================
# the preference family (minirlhf.audit_preference): the NumPy solve is where the library's loss stops


@pytest.fixture(scope="module")
def family(toy):
    from minirlhf.audit_preference import pair_counts, win_counts
    problem, ref, p_ref, _ = toy
    pairs = bradley_terry_pairs(p_ref, problem.R, 300, np.random.default_rng(0))
    counts = pair_counts(pairs, *p_ref.shape)
    with no_grad():
        ref_table = exact_logprobs(ref, problem.prompts, problem.completions).numpy()
    return problem, p_ref, pairs, counts, win_counts(counts), ref_table


def library_gradient(problem, p, loss, ref_table):
    policy = policy_at(problem, p)
    return flat_gradient(policy.parameters(), lambda: loss(
        exact_logprobs(policy, problem.prompts, problem.completions), ref_table)[0])


@pytest.mark.parametrize("name, eps, beta", [("exo_pair", 1e-3, 0.5), ("nca_pair", 0.0, 0.5),
                                             ("bco_pair", 0.0, 0.5), ("sppo_hard", 0.0, 0.5),
                                             ("simpo", 0.0, 2.0), ("orpo", 0.0, 0.1)])
def test_the_library_loss_has_gradient_0_at_the_numpy_fixed_point(family, name, eps, beta):
    """Two independent routes to one optimum: Newton on the loss's formula in plain NumPy (complex-step
    derivatives), and autograd through the library's loss; at the first, the second's gradient is 0."""
    from minirlhf.audit_preference import PromptObjective, fixed_point, library_loss, pair_objective_terms
    problem, p_ref, pairs, counts, (chosen_n, rejected_n), ref_table = family

    def make(x, s):
        phi, elem = pair_objective_terms(name, beta, eps, chosen_n=chosen_n[x], rejected_n=rejected_n[x])
        return PromptObjective(counts[x], np.log(p_ref[x]), phi, elem)
    q, residual = fixed_point(make, p_ref)
    assert residual < 1e-12
    g = library_gradient(problem, q, library_loss(name, beta, pairs, eps), ref_table)
    assert np.abs(g).max() < 1e-9
    assert np.abs(library_gradient(problem, p_ref, library_loss(name, beta, pairs, eps), ref_table)).max() > 1e-3


def test_kto_with_its_reference_point_at_0_is_apo_zero_at_half_the_gradient(family):
    """z0 = max(0, mean log-ratio of the mismatched pairs) is 0 wherever that mean is negative, as at
    p_ref (-KL ≤ 0 in expectation); KTO's mean runs over twice as many examples as APO-zero's pairs."""
    from minirlhf.audit_preference import library_loss
    problem, p_ref, pairs, _, _, ref_table = family
    p = optimal_policy(p_ref, problem.R, problem.beta)
    kto = library_gradient(problem, p, library_loss("kto", problem.beta, pairs), ref_table)
    apo = library_gradient(problem, p, library_loss("apo_zero", problem.beta, pairs), ref_table)
    np.testing.assert_allclose(kto, apo / 2, rtol=1e-10, atol=1e-15)


def test_robust_dpo_falls_without_end_along_a_completion_chosen_in_fewer_than_eps_of_its_pairs():
    """rDPO's loss, from its formula, as completion 2's probability is pushed to 0: it falls at the
    rate the linear tails predict, β·((1-ε)·U - ε·D)/(1-2ε) per unit of log p, for ever; a
    completion chosen in more than ε of its pairs is not such a direction."""
    from minirlhf.audit_preference import PromptObjective, pair_objective, robust_unbounded, win_counts
    eps, beta = 0.1, 0.5
    C = np.array([[0, 5, 12], [4, 0, 8], [1, 0, 0]], dtype=float)   # C[a, b]: a chosen over b
    chosen_n, rejected_n = win_counts(C[None])
    np.testing.assert_array_equal(robust_unbounded(chosen_n, rejected_n, eps), [[False, False, True]])
    log_ref = np.log(np.full(3, 1 / 3))
    loss = PromptObjective(C, log_ref, pair_objective("robust", beta, eps))

    def at(t):                                                       # log p with p_2 lowered by e^-t
        ell = log_ref.copy()
        ell[2] -= t
        return loss.value(ell - np.log(np.exp(ell).sum()))
    values = [at(t) for t in (0, 20, 40, 80)]
    assert values[0] > values[1] > values[2] > values[3]
    U, D = C[2].sum(), C[:, 2].sum()                                 # 1 won, 20 lost
    slope = beta * ((1 - eps) * U - eps * D) / (1 - 2 * eps) / C.sum()
    assert (values[3] - values[2]) / 40 == pytest.approx(slope, rel=1e-6)
    assert not robust_unbounded(np.array([[5.0]]), np.array([[20.0]]), eps).any()   # 20% > ε
