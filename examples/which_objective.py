"""Which objective does each algorithm optimise? Three exact tables on the enumerable toy problem.

The lecture's objective is J(p) = E[R] - β·KL(p ‖ p_ref), maximised by p* ∝ p_ref·exp(R/β). With
every completion listed (`minirlhf.closed_form`), expectations are exact sums, so this script can
say, with numbers rather than sampling noise (`minirlhf.audit`):

    1. which gradient each placement of the KL really follows (k1/k2/k3 in the loss, k1 in the
       reward), for one token and for a whole sequence;
    2. where REINFORCE, PPO, GRPO (and its variants), DPO and IPO converge, how far that is from p*,
       and which objective's optimum they reach instead, checked against an independent solution;
    3. the exact bias and variance of REINFORCE's gradient for the baselines none, mean (with the
       sample itself), leave-one-out, and GRPO's group normalisation, at several group sizes.

    pip install -e .
    python examples/which_objective.py            # about a minute on a CPU
    python examples/which_objective.py --smoke    # a few steps of everything, for CI
"""

import argparse
import time

import numpy as np

from minirlhf.audit import TARGETS, convergence_table, estimator_moments, kl_placement_table


def table(header, rows):
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print()


def small(v):
    """A float as the table shows it; rounding below 1e-12 is 0."""
    return "0" if abs(v) < 1e-12 else f"{v:.2g}" if abs(v) < 0.01 else f"{v:.3f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="a few steps of everything")
    args = ap.parse_args()
    t0 = time.time()

    print("## 1. Where the KL goes: relative error ‖E[∇estimator] - target‖/‖target‖ (0 = equal)\n")
    table(["setting", "KL placement", "‖g‖/‖∇KL(p_θ‖p_ref)‖", *TARGETS],
          [[setting, name, small(norm), *(small(e) for e in errors.values())]
           for setting, name, norm, errors in kl_placement_table()])

    print("## 2. Where each algorithm converges (β = 0.5, 2 prompts x 27 completions)\n")
    kw = (dict(n_pairs=200, steps=3, grpo_steps=3, ipo_steps=3, family_steps=3) if args.smoke else {})
    rows = convergence_table(**kw)
    table(["algorithm", "how", "KL(p_θ‖p*)", "J* - J", "E[R]", "KL(p_θ‖p_ref)",
           "optimum it reaches", "KL(p_θ‖that optimum)"],
          [[r["name"], r["how"], small(r["kl_to_optimum"]), small(r["gap"]), small(r["reward"]),
            small(r["kl_to_ref"]), r["optimises"], "—" if np.isnan(r["kl_to_claim"]) else small(max(r["kl_to_claim"], 0.0))]
           for r in rows])
    ipo = next(r for r in rows if "kl_to_population_claim" in r)
    print(f"IPO's population optimum p ∝ p_ref·exp(P(y ≻ p_ref)/β): KL(p_θ ‖ it) = "
          f"{small(ipo['kl_to_population_claim'])} (the rest is the pairs' sampling).\n")
    print("The preference family: residual max|∂L/∂g| of the independent solve; closed forms; notes.\n")
    for r in rows:
        if "residual" in r:
            parts = [f"residual {r['residual']:.1e}" if r["residual"] is not None else "no solve"]
            if r["closed_form"]:
                parts.append(f"KL(its optimum ‖ {r['closed_form'][0]}) = {small(r['closed_form'][1])}")
            if r["note"]:
                parts.append(r["note"])
            print(f"- {r['name']}: " + "; ".join(parts))
    print()

    print("## 3. REINFORCE's gradient per group of n: exact bias and variance (R̂ = R + 2 - β·k1)\n")
    moments, _ = estimator_moments(group_sizes=(2, 3) if args.smoke else (2, 3, 4, 6))
    table(["n", "baseline", "‖E ĝ - ∇J‖/‖∇J‖", "cos(E ĝ, ∇J)", "tr Cov ĝ"],
          [[str(n), b, small(bias), f"{cos:.4f}", f"{var:.3f}"] for n, b, bias, cos, var in moments])
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
