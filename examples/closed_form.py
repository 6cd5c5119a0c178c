"""RLHF where the answer is known: REINFORCE-with-KL and DPO both arrive at p* = p_ref·exp(R/β)/Z.

Two prompts, three tokens, completions of length three: 27 completions per prompt, few enough to
compute every probability exactly. For a reward table R and a reference policy p_ref, the optimum of

    J(p) = E_{y~p}[R(y|x)] - β·KL(p(·|x) ‖ p_ref(·|x))

is p*(y|x) = p_ref(y|x)·exp(R(y|x)/β)/Z(x). This script trains with the library's own losses and
prints how far each result is from it:

    (a) REINFORCE with KL, trained by sampling completions:   KL(p_θ ‖ p*) per prompt
        PPO (k1 in a per-token reward, GAE, clipped surrogate, a value per prefix): the same
    (b) DPO on preference pairs drawn from Bradley-Terry(R):   KL(p_θ ‖ p*) per prompt
    (c) a Bradley-Terry reward model on the same pairs:        Pearson(r, R) after centering
    (d) the exact gradient of J (autograd through the table) against the REINFORCE estimator
    (e) exact identities: DPO loss = log 2 at the reference, KL estimators = 0 there,
        k1 and k3 unbiased, k2 biased

and, when matplotlib is installed, saves a bar chart of p_ref, p* and the trained policies.

    pip install -e .
    python examples/closed_form.py                 # tabular policy, ~10 s
    python examples/closed_form.py --model gpt     # the same losses training a tiny GPT, ~1-2 min
    python examples/closed_form.py --smoke         # a few steps of everything, for CI
"""

import argparse
import time
from pathlib import Path

import numpy as np

from minirlhf.closed_form import (TabularPolicy, TabularValue, bradley_terry_pairs,
                                  centered_pearson, exact_gradient, exact_logprobs, exact_policy, kl,
                                  make_problem, make_sequences, optimal_policy, reinforce_gradients,
                                  train_dpo, train_ppo, train_reinforce, train_reward_table)
from minirlhf.losses import dpo_loss, kl_k1, kl_k2, kl_k3


def make_policy(kind, problem, seed):
    """The reference and the policy are two models built with the same seed: p_θ starts at p_ref."""
    if kind == "tabular":
        return TabularPolicy(problem.prompts, problem.n_tokens, problem.length, init_std=0.5,
                             seed=seed)
    from minirlhf.model import GPT, GPTConfig
    cfg = GPTConfig(block_size=problem.prompts.shape[1] + problem.length,
                    vocab_size=problem.n_tokens, n_layer=1, n_head=2, n_embd=16, dtype="float64")
    return GPT(cfg, seed=seed)


def fmt(values):
    return "[" + ", ".join(f"{v:.3g}" for v in np.atleast_1d(values)) + "]"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["tabular", "gpt"], default="tabular")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps of (a), (b), (c) (default: 300 tabular, 1500 gpt)")
    parser.add_argument("--pairs", type=int, default=10_000, help="preference pairs per prompt")
    parser.add_argument("--beta", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a quick run: few steps and samples")
    parser.add_argument("--plot", default="runs/examples/closed_form.png", help="where to save the bar chart")
    args = parser.parse_args()
    if args.beta <= 0:
        parser.error("--beta must be > 0")
    steps = args.steps or (300 if args.model == "tabular" else 1500)
    lr = 0.05 if args.model == "tabular" else 0.01
    n_pairs, n_batches = args.pairs, 400
    if args.smoke:
        steps, n_pairs, n_batches = 10, 500, 20

    # ----- the problem and its exact optimum ------------------------------------------------------
    problem = make_problem(n_prompts=2, n_tokens=3, length=3, beta=args.beta,
                           reward_scale=args.beta, seed=args.seed)
    ref = make_policy(args.model, problem, seed=1)
    p_ref = exact_policy(ref, problem.prompts, problem.completions)
    p_star = optimal_policy(p_ref, problem.R, problem.beta)
    print(f"{len(problem.prompts)} prompts x {len(problem.completions)} completions, "
          f"beta = {problem.beta}, policy: {args.model}, {steps} steps")
    print(f"KL(p_ref ‖ p*) per prompt, where training starts: {fmt(kl(p_ref, p_star))}")

    # ----- (a) REINFORCE with KL, by sampling --------------------------------------------------------
    t0 = time.time()
    rl_policy = make_policy(args.model, problem, seed=1)
    train_reinforce(rl_policy, ref, problem, steps=steps, n_per_prompt=32, lr=lr, baseline="loo",
                    seed=args.seed)
    p_rl = exact_policy(rl_policy, problem.prompts, problem.completions)
    print(f"(a) REINFORCE-with-KL: KL(p_θ ‖ p*) = {fmt(kl(p_rl, p_star))}  "
          f"({time.time() - t0:.1f} s)")

    # ----- (a) PPO as InstructGPT ran it: a tabular policy and a tabular value per prefix ----------
    t0 = time.time()
    ppo_policy = make_policy("tabular", problem, seed=1)
    ppo_ref = ref if args.model == "tabular" else make_policy("tabular", problem, seed=1)
    p_ppo_ref = exact_policy(ppo_ref, problem.prompts, problem.completions)
    ppo_star = optimal_policy(p_ppo_ref, problem.R, problem.beta)
    value = TabularValue(problem.prompts, problem.n_tokens, problem.length)
    train_ppo(ppo_policy, ppo_ref, value, problem, steps=min(steps, 150), n_per_prompt=32, lr=0.05,
              seed=args.seed)
    p_ppo = exact_policy(ppo_policy, problem.prompts, problem.completions)
    ids, _ = make_sequences(problem.prompts, problem.completions[:len(problem.prompts)])
    # values[:, t] is the value of the prefix before token t: at t = Tp, V(x, empty prefix)
    v_empty = value(ids).numpy()[:, problem.prompts.shape[1]]
    log_z = np.log((p_ppo_ref * np.exp(problem.R / problem.beta)).sum(axis=1))
    print(f"(a) PPO (tabular policy and value): KL(p_θ ‖ p*) = {fmt(kl(p_ppo, ppo_star))}; "
          f"V(x, empty prefix) = {fmt(v_empty)} vs β·log Z(x) = "
          f"{fmt(problem.beta * log_z)}  ({time.time() - t0:.1f} s)")

    # ----- (b) DPO on Bradley-Terry pairs ----------------------------------------------------------
    t0 = time.time()
    pairs = bradley_terry_pairs(p_ref, problem.R, n_pairs, np.random.default_rng(args.seed))
    dpo_policy = make_policy(args.model, problem, seed=1)
    train_dpo(dpo_policy, ref, problem, pairs, steps=steps, lr=lr)
    p_dpo = exact_policy(dpo_policy, problem.prompts, problem.completions)
    print(f"(b) DPO on {n_pairs} pairs/prompt: KL(p_θ ‖ p*) = {fmt(kl(p_dpo, p_star))}  "
          f"({time.time() - t0:.1f} s)")

    # ----- (c) a Bradley-Terry reward model ------------------------------------------------------
    r = train_reward_table(problem, pairs, steps=steps, lr=0.1)
    print(f"(c) reward model: Pearson(r, R) after per-prompt centering = "
          f"{centered_pearson(r, problem.R):.4f}")

    # ----- (d) REINFORCE estimates the exact gradient ----------------------------------------------
    t0 = time.time()
    policy = make_policy(args.model, problem, seed=2)                  # away from the reference
    g = exact_gradient(policy, ref, problem)
    for baseline in ("none", "loo"):
        rows = reinforce_gradients(policy, ref, problem, n_batches=n_batches, n_per_prompt=8,
                                   seed=args.seed, baseline=baseline)
        se = rows.std(axis=0, ddof=1) / np.sqrt(n_batches)
        z = np.abs(rows.mean(axis=0) - g) / np.maximum(se, 1e-12)
        print(f"(d) baseline {baseline:4s}: |mean estimate - exact ∇J| <= {z.max():.2f} standard "
              f"errors over {g.size} parameters ({n_batches} batches, "
              f"max |∇J| = {np.abs(g).max():.3f})")
    print(f"    ({time.time() - t0:.1f} s)")

    # ----- (e) exact identities ---------------------------------------------------------------------
    prompt, chosen, rejected = (a[:100] for a in pairs)
    table = exact_logprobs(make_policy(args.model, problem, seed=1), problem.prompts,
                           problem.completions)
    ref_table = np.log(p_ref)
    loss, _ = dpo_loss(table[prompt, chosen], table[prompt, rejected],
                       ref_table[prompt, chosen], ref_table[prompt, rejected], beta=problem.beta)
    print(f"(e) DPO loss at p_θ = p_ref: {loss.item():.12f} (log 2 = {np.log(2):.12f})")
    same = ref_table.ravel()
    print(f"    KL estimators at p_θ = p_ref: k1 {np.abs(kl_k1(same, same)).max()}, "
          f"k2 {np.abs(kl_k2(same, same)).max()}, k3 {np.abs(kl_k3(same, same)).max()}")
    rng = np.random.default_rng(args.seed)
    y = rng.choice(27, size=100_000, p=p_star[0])                       # samples of p*, against p_ref
    lp, lq = np.log(p_star[0, y]), np.log(p_ref[0, y])
    exact_kl = kl(p_star[:1], p_ref[:1])[0]
    for name, k in (("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)):
        v = k(lp, lq)
        print(f"    {name}: Monte Carlo {v.mean():.4f} ± {v.std() / np.sqrt(len(v)):.4f} "
              f"vs exact KL(p* ‖ p_ref) = {exact_kl:.4f}")

    # ----- the picture ------------------------------------------------------------------------------
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, axes = plt.subplots(len(problem.prompts), 1, figsize=(12, 3.2 * len(problem.prompts)))
    labels = ["".join(map(str, y)) for y in problem.completions]
    x = np.arange(len(labels))
    for i, ax in enumerate(np.atleast_1d(axes)):
        bars = [("p_ref", p_ref), ("p* (closed form)", p_star), ("REINFORCE-with-KL", p_rl),
                ("DPO", p_dpo)] + ([("PPO", p_ppo)] if args.model == "tabular" else [])
        for k, (name, p) in enumerate(bars):
            ax.bar(x + (k - (len(bars) - 1) / 2) * 0.16, p[i], width=0.16, label=name)
        ax.set_xticks(x, labels, rotation=90, fontsize=7)
        ax.set_ylabel(f"p(y | prompt {i})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=120)
    print(f"saved {args.plot}")


if __name__ == "__main__":
    main()
