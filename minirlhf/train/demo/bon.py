"""The demo's best-of-n baseline: the curve every RLHF result is measured against.

`run_bon` runs ``minirlhf bon`` (`minirlhf.train.bon`) from the SFT model with the reward model on
held-out prompts, for n = 1, 2, 4, ..., 64. `gao_fits` fits Gao et al.'s (2022) forms to the gains
over SFT against d = sqrt(KL):

    best-of-n:  R(d) = d·(α - β·d)          RL:  R(d) = d·(α - β·log d)

by least squares (both are linear in α and β); `report_lines` writes the table and the
coefficients, `draw` the curves beside the RL, PPO, DPO and GRPO points.

The settings are kept here rather than in the plan (`BON`), so that a run folder from before this
stage existed is still reused stage by stage.
"""

import math

import numpy as np

from ..bon import BonConfig, bon
from .plan import read_json

# per preset: the n values, how many held-out prompts, prompts per step, reply length
BON = {
    "quick": dict(n="1,2,4,8,16,32,64", prompts=64, prompts_per_step=4, max_new_tokens=40),
    "large": dict(n="1,2,4,8,16,32,64", prompts=256, prompts_per_step=8, max_new_tokens=64),
    "smoke": dict(n="1,2,4", prompts=4, prompts_per_step=2, max_new_tokens=24),
}
RL_KINDS = ("RL", "PPO", "GRPO")          # the policies trained by RL against the reward model


def run_bon(out, cfg, stages, sft_ckpt, rm_ckpt):
    """The bon stage (skipped when up to date); returns its table, one dict per n."""
    b = BON["smoke" if cfg.smoke else cfg.preset]
    run_cfg = BonConfig(prompts=str(out / "data" / "prompts_held_out.jsonl"), init=str(sft_ckpt),
                        reward_model=str(rm_ckpt), n=b["n"], num_prompts=b["prompts"],
                        prompts_per_step=b["prompts_per_step"], max_new_tokens=b["max_new_tokens"],
                        out_dir=str(out / "bon"), seed=cfg.seed + 11, device=cfg.device,
                        quiet=cfg.quiet, overwrite=True)
    steps = math.ceil(b["prompts"] / b["prompts_per_step"])
    stages.run("bon", out / "bon" / "ckpt.npz", lambda: bon(run_cfg),
               inputs=[sft_ckpt, rm_ckpt, run_cfg.prompts], steps=steps)
    return read_json(out / "bon" / "run.json")["result"]["table"]


def fit(d, gain, form):
    """(α, β) of ``gain ≈ d·(α - β·d)`` (form "bon") or ``d·(α - β·log d)`` ("rl"), least squares;
    None with fewer than two points of d > 0."""
    d, gain = np.asarray(d, dtype=np.float64), np.asarray(gain, dtype=np.float64)
    keep = d > 0
    if keep.sum() < 2:
        return None
    d, gain = d[keep], gain[keep]
    second = d * d if form == "bon" else d * np.log(d)
    A = np.stack([d, -second], axis=1)                               # (points, 2)
    (alpha, beta), *_ = np.linalg.lstsq(A, gain, rcond=None)
    return float(alpha), float(beta)


def curve(params, d, form):
    alpha, beta = params
    d = np.asarray(d, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        second = d if form == "bon" else np.where(d > 0, np.log(d), 0.0)
    return d * (alpha - beta * second)


def points(table, evals):
    """The points of the picture, as gains over their own start: best-of-n's (d, gold, rm) from
    its table (over its n = 1), the RL-trained policies' from their evaluations (over SFT's)."""
    base = table[0]
    bon_pts = [(math.sqrt(max(r["kl"], 0.0)), r["gold"] - base["gold"], r["reward"] - base["reward"])
               for r in table]
    sft = evals["SFT"]
    rl_pts = [(math.sqrt(max(ev["kl"], 0.0)), ev["gold"] - sft["gold"], ev["rm"] - sft["rm"])
              for name, ev in evals.items() if name.split(" ")[0] in RL_KINDS]
    return bon_pts, rl_pts


def gao_fits(table, evals):
    """{"bon": {"gold": (α, β), "rm": ...}, "rl": {...}} fitted to the gains over SFT."""
    bon_pts, rl_pts = points(table, evals)
    fits = {}
    for form, pts in (("bon", bon_pts), ("rl", rl_pts)):
        if pts:
            d, gold, rm = map(np.array, zip(*pts))
            fits[form] = {"gold": fit(d, gold, form), "rm": fit(d, rm, form)}
    return fits


def report_lines(table, fits):
    """The report's section: the table per n and the fitted coefficients."""
    lines = ["## Best-of-n", "",
             f"The SFT model samples {table[-1]['n']} replies to each of {table[0]['prompts']} "
             "held-out prompts; best-of-n keeps the one the reward model scores highest among the "
             "first n (`minirlhf bon`). KL(π_bon ‖ p_sft): the formula log n - (n-1)/n, and the "
             "estimate from the samples (the formula less the overstatement of the ties they "
             "reveal, `minirlhf.bon.tie_corrected_kl`).", "",
             "| n | reward model | gold ± se | KL formula | KL estimate | sqrt(KL) |",
             "|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['n']} | {r['reward']:.3f} | {r['gold']:.3f} ± {r['gold_se'] or 0:.3f} | "
                     f"{r['kl_analytic']:.3f} | {r['kl']:.3f} | {math.sqrt(max(r['kl'], 0)):.3f} |")
    lines += ["", "Gao et al.'s forms fitted by least squares to the gains over the start, d = "
              "sqrt(KL): best-of-n R = d·(α - β·d), RL (RL, PPO and GRPO pooled) "
              "R = d·(α - β·log d):", "", "| form | reward | α | β |", "|---|---|---|---|"]
    for form, name in (("bon", "best-of-n"), ("rl", "RL")):
        for key, what in (("rm", "reward model"), ("gold", "gold")):
            params = fits.get(form, {}).get(key)
            lines.append(f"| {name} | {what} | " + (f"{params[0]:.3f} | {params[1]:.3f} |" if params
                                                    else "— | — |"))
    return lines + [""]


def draw_on_frontier(ax, table, sft_gold):
    """Best-of-n's gold reward against its KL estimate on the frontier plot, one point per n. Its
    n = 1 is the SFT model on fewer prompts, so the curve starts at SFT's point: ``sft_gold`` plus
    each n's gain over n = 1."""
    kl = [max(r["kl"], 0.0) for r in table]
    gold = [sft_gold + r["gold"] - table[0]["gold"] for r in table]
    ax.plot(kl, gold, "k.--", lw=0.8, label="best-of-n")
    ax.annotate(f"n={table[-1]['n']}", (kl[-1], gold[-1]), textcoords="offset points",
                xytext=(4, -10), fontsize=8)


def draw(plt, table, evals, fits):
    """The figure of bon_frontier.png: gold (left) and reward-model (right) gains against
    sqrt(KL), best-of-n's curve and the RL, PPO, DPO and GRPO points, the fitted forms dashed."""
    bon_pts, rl_pts = points(table, evals)
    sft = evals["SFT"]
    d_bon = np.array([p[0] for p in bon_pts])
    grid = np.linspace(0, max([p[0] for p in bon_pts + rl_pts] + [1e-3]) * 1.05, 200)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), squeeze=False)
    for ax, key, col, label in ((axes[0, 0], "gold", 1, "gold reward"),
                                (axes[0, 1], "rm", 2, "reward-model reward")):
        gains = [p[col] for p in bon_pts]
        ax.plot(d_bon, gains, "k.-", label="best-of-n")
        for r, x, y in zip(table, d_bon, gains):
            ax.annotate(str(r["n"]), (x, y), textcoords="offset points", xytext=(3, -9), fontsize=7)
        for kind, style in (("RL", "o"), ("PPO", "s"), ("DPO", "^"), ("GRPO", "D")):
            evs = [ev for name, ev in evals.items() if name.split(" ")[0] == kind]
            if evs:
                ax.plot([math.sqrt(max(ev["kl"], 0)) for ev in evs],
                        [ev[key] - sft[key] for ev in evs], style, label=kind)
        for form, style in (("bon", "k--"), ("rl", "C0--")):
            params = fits.get(form, {}).get(key)
            if params:                     # best-of-n's fit only where its points are
                d = grid[grid <= d_bon.max()] if form == "bon" else grid
                ax.plot(d, curve(params, d, form), style, lw=0.8,
                        label=f"fit {form}: α={params[0]:.2f}, β={params[1]:.2f}")
        ax.set_xlabel("sqrt(KL to SFT), sqrt(nats)")
        ax.set_ylabel(f"{label}, gain over start")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Best-of-n against RL: where the proxy and the gold part")
    fig.tight_layout()
    return fig
