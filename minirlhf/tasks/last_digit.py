"""The audit link: the addition task cut to one token, the last digit of the sum, solved exactly.

A prompt ``a + b = `` is answered by one of the 10 digits, and R(y|x) = 1 if y is the last digit
of a + b, else 0. The reference, like an imperfect SFT model, puts probability q on the right digit
and spreads 1 - q evenly on the nine others; three prompts with q = 0.1, 0.5 and 0.9. Every
completion can be listed, so `minirlhf.audit`'s machinery says exactly where each algorithm stops.
With a 0/1 reward, p* ∝ p_ref·exp(R/β) keeps the odds of the right digit at e^{1/β} times the
reference's:  p*(right) = q·e^{1/β} / (q·e^{1/β} + 1 - q).

Why GRPO's std scaling matters here: a group of G samples of a 0/1 reward with success rate p has
std about √(p(1-p)), so dividing by it multiplies the reward by about 1/√(p(1-p)), most where the
policy is nearly always wrong or nearly always right. Not by all of that: the groups with the
smallest std are those whose G rewards are all equal (probability p^G + (1-p)^G), whose
advantages are all 0 and which teach nothing (what GRPO logs as ``frac_reward_zero_std``).
`std_scaling_table` gives the exact expected gap E[A|right] - E[A|wrong]: (G-1)/G without scaling
at any p; with it, 1.40 at p = 1/2 and 1.48 at p = 0.05 or 0.95 for G = 4, 1.74 and 2.31 for G = 8.
So GRPO with ``scale group`` acts as if the reward were larger, β smaller: it settles nearer to
"always right" than p*, most on the prompts the reference gets most wrong.

`last_digit_table` trains each algorithm to convergence (sampled, or by its exact expected
gradient) and reports p(right) per prompt, KL(p_θ ‖ p*) and KL to the optimum of the objective it
actually optimises; `std_scaling_table` shows the advantage gap of a right over a wrong sample.
"""

import numpy as np

from ..audit import (grpo_expected_advantage, grpo_group_fixed_point, per_token_optimum, set_policy,
                     train_grpo_expected)
from ..closed_form import (TabularPolicy, TabularValue, ToyProblem, enumerate_completions,
                           exact_policy, kl, optimal_policy, train_ppo, train_reinforce)
from .addition import answer_text

PAIRS = ((7, 5), (38, 45), (123, 456))                  # last digits of the sums: 2, 3, 9
P_RIGHT = (0.1, 0.5, 0.9)


def last_digit_problem(beta=0.5, pairs=PAIRS, p_right=P_RIGHT):
    """(problem, ref): the one-token ToyProblem (prompt x is the pair ``pairs[x]``, its token id x)
    and a `TabularPolicy` holding the reference table."""
    completions = enumerate_completions(10, 1)                           # (10, 1): the digits
    right = [int(answer_text(a, b)[0]) for a, b in pairs]                # the first digit written
    R = np.zeros((len(pairs), 10))
    R[np.arange(len(pairs)), right] = 1.0
    p_ref = np.where(R == 1, np.asarray(p_right)[:, None], (1 - np.asarray(p_right)[:, None]) / 9)
    problem = ToyProblem(np.arange(len(pairs))[:, None], completions, R, float(beta), 10)
    ref = set_policy(_policy(problem), problem, p_ref)
    return problem, ref


def _policy(problem):
    return TabularPolicy(problem.prompts, 10, 1, init_std=0.0, seed=0)


def p_star_right(q, beta):
    """p*(right) for a reference that puts q on the right answer: q·e^{1/β} / (q·e^{1/β} + 1 - q)."""
    q = np.asarray(q, dtype=np.float64)
    return q * np.exp(1 / beta) / (q * np.exp(1 / beta) + 1 - q)


def last_digit_table(beta=0.5, G=4, steps=300, grpo_steps=1000, seed=0):
    """Each algorithm from the reference to convergence: a dict per row with ``name``, ``how``,
    ``p_right`` (per prompt), ``kl_to_optimum`` (mean KL(p_θ ‖ p*)), ``optimises`` and
    ``kl_to_claim`` (mean KL to that objective's optimum). The first row is p* itself."""
    problem, ref = last_digit_problem(beta)
    ys, R = problem.completions, problem.R
    p_ref = exact_policy(ref, problem.prompts, ys)
    p_star = optimal_policy(p_ref, R, beta)
    c = (G - 1) / G
    rows = []

    def row(name, how, p, optimises, claim):
        rows.append({"name": name, "how": how, "p_right": (p * R).sum(1).tolist(),
                     "kl_to_optimum": float(kl(p, p_star).mean()), "optimises": optimises,
                     "kl_to_claim": float(kl(p, claim).mean())})

    def start():
        return set_policy(_policy(problem), problem, p_ref)

    lecture = "E[R] - β·KL(p‖p_ref)"
    row("reference (SFT)", "—", p_ref, "—", p_ref)
    row("p* ∝ p_ref·exp(R/β)", "closed form", p_star, lecture, p_star)
    policy = train_reinforce(start(), ref, problem, steps=steps, baseline="loo", seed=seed)
    row("REINFORCE (RLOO), k1 in the reward", "sampled, 32 per prompt",
        exact_policy(policy, problem.prompts, ys), lecture, p_star)
    policy = train_ppo(start(), ref, TabularValue(problem.prompts, 10, 1), problem, steps=steps,
                       seed=seed)
    row("PPO (k1 per-token reward, GAE, clip)", "sampled, 32 per prompt",
        exact_policy(policy, problem.prompts, ys), lecture, p_star)
    grpo_rows = [("GRPO, k3 in the loss, scale none (Dr. GRPO)", "none", False,
                  "E[R] - β'·KL(p_ref‖p), β' = β·G/(G-1)",
                  per_token_optimum(p_ref, R, beta, 10, 1, "forward", c)),
                 ("GRPO, k3·ρ in the loss (TRL default), scale none", "none", True,
                  "E[R] - β'·KL(p‖p_ref), β' = β·G/(G-1)",
                  per_token_optimum(p_ref, R, beta, 10, 1, "reverse", c)),
                 ("GRPO, k3 in the loss, scale group", "group", False,
                  "E[R'] - β·KL(p_ref‖p), R' = E[A \\| y] = R/σ_group at that point",
                  grpo_group_fixed_point(p_ref, R, beta, G, 10, 1))]
    for name, scale, corrected, optimises, claim in grpo_rows:
        policy = train_grpo_expected(start(), ref, problem, G, scale, corrected, steps=grpo_steps)
        row(name, f"expected gradient, G = {G}", exact_policy(policy, problem.prompts, ys),
            optimises, claim)
    return rows


def std_scaling_table(G=4, ps=(0.05, 0.2, 0.5, 0.8, 0.95)):
    """For a 0/1 reward with success rate p: GRPO's expected advantage of a right sample minus a
    wrong one, E[A|right] - E[A|wrong], with scale none and scale group, and the share of groups
    with zero std, p^G + (1-p)^G. Rows ``(p, gap_none, gap_group, frac_zero_std)``."""
    R = np.zeros((1, 2))
    R[0, 0] = 1.0                                                        # answer 0 right, 1 wrong
    out = []
    for p in ps:
        probs = np.array([[p, 1 - p]])
        gaps = [float(np.diff(grpo_expected_advantage(probs, R, G, scale)[0])[0] * -1)
                for scale in ("none", "group")]
        out.append((p, *gaps, p ** G + (1 - p) ** G))
    return out


def markdown(beta=0.5, G=4, steps=300, grpo_steps=1000):
    """The two tables as markdown (``python -m minirlhf.tasks.last_digit`` prints them)."""
    rows = last_digit_table(beta, G, steps, grpo_steps)
    qs = ", ".join(f"q = {q:g}" for q in P_RIGHT)
    lines = [f"| algorithm | how | p(right) at {qs} | KL(p_θ‖p*) | optimises | KL to its optimum |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        p = " / ".join(f"{v:.3f}" for v in r["p_right"])
        lines.append(f"| {r['name']} | {r['how']} | {p} | {_num(r['kl_to_optimum'])} | "
                     f"{r['optimises']} | {_num(r['kl_to_claim'])} |")
    lines += ["", "| G | p | E[A \\| right] - E[A \\| wrong], scale none | scale group | frac_reward_zero_std |",
              "|---|---|---|---|---|"]
    for g in (4, 8):
        for p, none, group, zero in std_scaling_table(g):
            lines.append(f"| {g} | {p:g} | {none:.3f} | {group:.3f} | {zero:.3f} |")
    return "\n".join(lines)


def _num(v):
    return "0" if abs(v) < 1e-12 else f"{v:.2g}"


if __name__ == "__main__":
    print(markdown())
