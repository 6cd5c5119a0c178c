"""The demo's two plots, drawn with matplotlib when it is installed (``pip install -e ".[plot]"``).

frontier.png: gold reward against KL to the SFT model for each algorithm across β (the DPO
paper's Figure 2 in miniature); rl_gold_vs_rm.png: the reward model's score and the gold reward of
each RL step's samples, where over-optimisation of the proxy shows.
"""

import os

import numpy as np

from .family import family_points
from . import bon as demo_bon
from .plan import beta_name, read_metrics


def make_plots(out, plan, evals, policies, bon_table=None, fits=None):
    """frontier.png and rl_gold_vs_rm.png (and bon_frontier.png with ``bon_table``), or None
    without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None

    # frontier.png: SFT at KL 0, then one point per β for each algorithm
    fig, ax = plt.subplots(figsize=(6, 4.2))
    base = evals["SFT"]
    ax.errorbar([0], [base["gold"]], yerr=[base["gold_se"]], fmt="ks", label="SFT", capsize=3)
    for kind, style in (("RL", "o-"), ("PPO", "s-"), ("DPO", "^-"), ("GRPO", "D-")):
        names = [n for n in policies if n.startswith(kind + " ")]
        pts = sorted((evals[n]["kl"], evals[n]["gold"], evals[n]["gold_se"], n) for n in names)
        if not pts:
            continue
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt=style,
                    label=kind, capsize=3)
        for kl, g, _, n in pts:
            ax.annotate(n.split()[1], (kl, g), textcoords="offset points", xytext=(4, 4), fontsize=8)
    family_points(ax, evals, policies)                                  # KTO, SimPO, ORPO
    if bon_table:
        demo_bon.draw_on_frontier(ax, bon_table, evals["SFT"]["gold"])
    ax.set_xlabel("KL(p_θ ‖ p_sft), nats per reply")
    ax.set_ylabel("gold reward (held-out prompts)")
    ax.set_title("Reward against KL")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "frontier.png.tmp.png", dpi=110)
    plt.close(fig)
    os.replace(out / "frontier.png.tmp.png", out / "frontier.png")

    # rl_gold_vs_rm.png: one panel per RL β, the two rewards on their own y axes
    betas = plan["rl"]["betas"]
    fig, axes = plt.subplots(1, len(betas), figsize=(4.2 * len(betas), 3.4), squeeze=False)  # (1, β)
    for ax, beta in zip(axes[0], betas):
        m = read_metrics(out / f"rl_beta{beta_name(beta)}")
        if not m:
            continue
        steps = [r["step"] for r in m]
        ax.plot(steps, _smooth([r["reward"] for r in m]), color="C0", label="reward model")
        ax.set_xlabel("RL step")
        ax.set_ylabel("reward-model reward", color="C0")
        ax2 = ax.twinx()
        ax2.plot(steps, _smooth([r["gold"] for r in m]), color="C3", label="gold")
        ax2.set_ylabel("gold reward", color="C3")
        ax.set_title(f"RL β={beta_name(beta)}")
    fig.tight_layout()
    fig.savefig(out / "rl_gold_vs_rm.png.tmp.png", dpi=110)
    plt.close(fig)
    os.replace(out / "rl_gold_vs_rm.png.tmp.png", out / "rl_gold_vs_rm.png")
    if not bon_table:
        return "frontier.png", "rl_gold_vs_rm.png"
    fig = demo_bon.draw(plt, bon_table, evals, fits)
    fig.savefig(out / "bon_frontier.png.tmp.png", dpi=110)
    plt.close(fig)
    os.replace(out / "bon_frontier.png.tmp.png", out / "bon_frontier.png")
    return "frontier.png", "rl_gold_vs_rm.png", "bon_frontier.png"


def _smooth(values, window=5):
    """A trailing moving average (the per-step means of a few dozen samples are noisy)."""
    v = np.asarray(values, dtype=np.float64)              # (S,) one value per step
    c = np.cumsum(np.insert(v, 0, 0.0))                   # (S + 1,) c[i] = v[0] + ... + v[i-1]
    n = np.minimum(np.arange(1, len(v) + 1), window)      # (S,) how many values each mean takes
    return (c[1:] - c[np.arange(1, len(v) + 1) - n]) / n
