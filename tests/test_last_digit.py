"""The one-token addition audit: p* in closed form, GRPO's std scaling on a 0/1 reward, and each
GRPO variant's expected-gradient training arriving at the optimum of the objective it optimises."""

import itertools

import numpy as np
import pytest

from minirlhf.audit import grpo_group_fixed_point, per_token_optimum, set_policy, train_grpo_expected
from minirlhf.closed_form import exact_policy, kl, optimal_policy
from minirlhf.tasks import last_digit as L


def test_the_reference_puts_q_on_the_last_digit_of_the_sum():
    problem, ref = L.last_digit_problem()
    p_ref = exact_policy(ref, problem.prompts, problem.completions)
    assert np.argmax(problem.R, axis=1).tolist() == [2, 3, 9]            # 12, 83, 579
    np.testing.assert_allclose((p_ref * problem.R).sum(1), L.P_RIGHT, atol=1e-12)
    np.testing.assert_allclose(p_ref.sum(1), 1, atol=1e-12)


def test_p_star_keeps_the_odds_of_the_right_digit_at_exp_one_over_beta_times_the_reference():
    problem, ref = L.last_digit_problem(beta=0.5)
    p_star = optimal_policy(exact_policy(ref, problem.prompts, problem.completions), problem.R, 0.5)
    np.testing.assert_allclose((p_star * problem.R).sum(1), L.p_star_right(L.P_RIGHT, 0.5), atol=1e-12)


def test_std_scaling_leaves_the_unscaled_gap_at_g_minus_1_over_g_and_widens_it_at_the_extremes():
    rows = L.std_scaling_table(G=8, ps=(0.05, 0.2, 0.5, 0.8, 0.95))
    for p, gap_none, gap_group, zero in rows:
        assert gap_none == pytest.approx(7 / 8)
        assert gap_group > gap_none
        assert zero == pytest.approx(p ** 8 + (1 - p) ** 8)
    gaps = [r[2] for r in rows]
    assert gaps[0] > gaps[1] > gaps[2] < gaps[3] < gaps[4]             # least help at p = 1/2


def test_the_group_scaled_gap_is_the_mean_over_every_group():
    G, p = 3, 0.3
    gap = {}
    for first in (1.0, 0.0):
        total = 0.0
        for others in itertools.product((1.0, 0.0), repeat=G - 1):
            r = np.array([first, *others])
            weight = np.prod([p if o else 1 - p for o in others])
            std = r.std(ddof=1)
            total += weight * (r[0] - r.mean()) / (std + 1e-4)
        gap[first] = total
    (_, _, gap_group, _), = L.std_scaling_table(G=G, ps=(p,))
    assert gap_group == pytest.approx(gap[1.0] - gap[0.0], rel=1e-12)


@pytest.mark.parametrize("scale, corrected", [("none", False), ("group", False)])
def test_grpo_by_its_expected_gradient_reaches_its_own_optimum_not_p_star(scale, corrected):
    problem, ref = L.last_digit_problem(beta=0.5)
    p_ref = exact_policy(ref, problem.prompts, problem.completions)
    p_star = optimal_policy(p_ref, problem.R, 0.5)
    if scale == "none":
        claim = per_token_optimum(p_ref, problem.R, 0.5, 10, 1, "forward", c=3 / 4)
    else:
        claim = grpo_group_fixed_point(p_ref, problem.R, 0.5, 4, 10, 1)
    policy = set_policy(L._policy(problem), problem, p_ref)
    policy = train_grpo_expected(policy, ref, problem, 4, scale, corrected, steps=600)
    p = exact_policy(policy, problem.prompts, problem.completions)
    assert kl(p, claim).max() < 1e-6
    assert kl(p, p_star).mean() > 1e-2
    if scale == "group":      # std scaling pushes the weakest prompt's right digit past p*
        assert (p * problem.R).sum(1)[0] > L.p_star_right(L.P_RIGHT[0], 0.5) + 0.1


def test_the_tables_print_every_algorithm_and_group_size():
    text = L.markdown(steps=2, grpo_steps=2)
    for name in ("p* ∝ p_ref·exp(R/β)", "REINFORCE (RLOO)", "PPO", "scale none (Dr. GRPO)",
                 "k3·ρ in the loss", "scale group"):
        assert name in text
    assert "| 8 | 0.95 | 0.875 | 2.313 | 0.663 |" in text
