"""The KL of best-of-n to its reference, three ways: the formula, the exact value, a sampled estimate.

Best-of-n (sample n replies from the reference, keep the one the reward likes best) is the baseline
of every RLHF result, and its KL to the reference is usually quoted as

    KL(π_bon ‖ π_ref) = log n - (n-1)/n,

which is exact only when no two replies tie in reward; with ties it is an upper bound (Beirami et
al. 2024). On the enumerable problem of `minirlhf.closed_form` (2 prompts, 27 completions each) the
best-of-n distribution has a closed form (`minirlhf.bon`), so this script prints, for each n:

    the formula | the exact KL | the estimate `minirlhf bon` makes on a model, from pools of samples

once with the problem's rewards (27 distinct values per prompt) and once with them rounded to whole
numbers (a few heavy tie classes), where the formula overstates the KL by more than a nat at n = 64.
(`python -m pytest tests/test_bon.py` checks these numbers against the README's table.)

    pip install -e .
    python examples/best_of_n_kl.py            # a few seconds
    python examples/best_of_n_kl.py --smoke    # n up to 4, small pools, for CI
"""

import argparse

import numpy as np

from minirlhf import closed_form as cf
from minirlhf.bon import kl_table

NS = (1, 2, 4, 8, 16, 32, 64)


def problem(ties, seed=0):
    """p_ref (2, 27) of a random tabular policy on the closed-form problem and its rewards R
    (2, 27); with ``ties``, R rounded to whole numbers."""
    toy = cf.make_problem(n_prompts=2, n_tokens=3, length=3, seed=seed)
    policy = cf.TabularPolicy(toy.prompts, 3, 3, seed=seed)
    p_ref = cf.exact_policy(policy, toy.prompts, toy.completions)
    return p_ref, (np.round(toy.R) if ties else toy.R)


def f3(x):
    return f"{round(x, 3) + 0.0:.3f}"                                     # no "-0.000"


def readme_rows(ns=NS, pool=3000, repeats=8):
    """The README's table: one row of formatted cells per n."""
    distinct, tied = kl_table(*problem(False), ns, pool, repeats), kl_table(*problem(True), ns, pool, repeats)
    return [[str(a["n"]), f3(a["analytic"]), f3(a["exact"]), f"{f3(a['sampled'])} ± {f3(a['sampled_se'])}",
             f3(b["exact"]), f"{f3(b['sampled'])} ± {f3(b['sampled_se'])}"] for a, b in zip(distinct, tied)]


HEADER = ["n", "log n - (n-1)/n", "exact, distinct R", "sampled, distinct R", "exact, R rounded (ties)",
          "sampled, R rounded (ties)"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="n up to 4, small pools")
    args = ap.parse_args()
    rows = readme_rows(NS[:3], pool=200, repeats=2) if args.smoke else readme_rows()
    print("KL(π_bon ‖ p_ref) in nats per prompt, mean of 2 prompts; sampled: ± its standard error\n")
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER))
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
