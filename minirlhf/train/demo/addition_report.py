"""The addition demo's report: pass@1 and pass@k by digits, each policy's gain over SFT, GRPO's
zero-variance groups; report.md, accuracy.png (with matplotlib) and summary.json."""

import os

import numpy as np

from ...tasks.addition import pass_at_k, reward
from .evaluate import mean_se
from .plan import read_metrics, write_json


def pass_table(ev, k):
    """{"all" or digits: (pass@1, its SE, pass@k, prompts)} from an evaluation's counts."""
    n = ev["samples"]
    right, digits = np.array(ev["right"]), np.array(ev["digits"])
    table = {}
    for d in ["all", *sorted(set(digits.tolist()))]:
        sel = np.ones(len(right), bool) if d == "all" else digits == d
        p1 = [pass_at_k(n, int(c), 1) for c in right[sel]]
        pk = [pass_at_k(n, int(c), min(k, n)) for c in right[sel]]
        m, se = mean_se(p1)
        table[d] = (m, se, float(np.mean(pk)), int(sel.sum()))
    return table


def gain_over(ev, base):
    """pass@1 gain over ``base`` on the same prompts, and its standard error (paired over prompts)."""
    diff = (np.array(ev["right"]) - np.array(base["right"])) / ev["samples"]
    return mean_se(diff)


def zero_std_fraction(run_dir):
    """GRPO's logged frac_reward_zero_std: {"mean", "first", "last"} over its steps, or None."""
    values = [r["frac_reward_zero_std"] for r in read_metrics(run_dir)
              if "frac_reward_zero_std" in r]
    if not values:
        return None
    return {"mean": float(np.mean(values)), "first": values[0], "last": values[-1]}


def plot_accuracy(out, tables, k):
    """accuracy.png: pass@1 (solid) and pass@k (dashed) against digits, one colour per policy;
    None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, (name, table) in enumerate(tables.items()):
        ds = [d for d in table if d != "all"]
        colour = f"C{i}"
        ax.errorbar(ds, [table[d][0] for d in ds], yerr=[table[d][1] for d in ds], fmt="o-",
                    color=colour, capsize=3, label=f"{name} pass@1")
        ax.plot(ds, [table[d][2] for d in ds], "--", color=colour, alpha=0.6, label=f"{name} pass@{k}")
    ax.set_xlabel("digits of the longer operand")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(ds)
    ax.set_title("a + b on held-out pairs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = out / "accuracy.png"
    tmp = out / "accuracy.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_report(out, plan, cfg, evals, stages, seconds):
    """report.md and summary.json (and accuracy.png); returns the summary."""
    k = plan["eval"]["k"]
    tables = {name: pass_table(ev, k) for name, ev in evals.items()}
    base = evals["SFT"]
    digits = [d for d in tables["SFT"] if d != "all"]
    gains = {name: gain_over(ev, base) for name, ev in evals.items() if name != "SFT"}
    beats = {name: g > 2 * se for name, (g, se) in gains.items()}
    zero_std = zero_std_fraction(out / "grpo")
    plot = plot_accuracy(out, tables, k)

    t = plan["task"]
    lines = [
        "# minirlhf demo report: addition", "",
        f"Preset **{'smoke' if cfg.smoke else cfg.preset}**, seed {cfg.seed}, device {cfg.device}; "
        f"operands of 1 to {t['max_digits']} digits, the sum written least significant digit "
        f"first; {len(base['right'])} held-out pairs, {base['samples']} samples each at "
        f"temperature 1; reward 1 for the right sum, else 0.", "",
        f"## pass@1 (pass@{k}) on the held-out pairs, by digits of the longer operand", "",
        "| policy | all | " + " | ".join(f"{d} digits" for d in digits) + " |",
        "|---|---|" + "---|" * len(digits),
    ]
    for name, table in tables.items():
        cells = [f"{table[d][0]:.3f} ({table[d][2]:.3f})" for d in ["all", *digits]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Pairs per column: " + ", ".join(
        f"{d} digits {tables['SFT'][d][3]}" for d in digits) + ".", "",
        "## pass@1 gain over SFT (paired over the held-out prompts)", "",
        "| policy | pass@1 | gain ± SE | gain / SE |", "|---|---|---|---|"]
    for name, (g, se) in gains.items():
        z = g / se if se > 0 else float("nan")
        lines.append(f"| {name} | {tables[name]['all'][0]:.3f} ± {tables[name]['all'][1]:.3f} | "
                     f"{g:+.3f} ± {se:.3f}{' ✓' if beats[name] else ''} | {z:.1f} |")
    best = max(gains, key=lambda n: gains[n][0])
    lines += ["", f"Best: **{best}** ({gains[best][0]:+.3f} ± {gains[best][1]:.3f}). "
              + ("At least one RL method beats SFT by more than 2 standard errors (✓)."
                 if any(beats.values()) else
                 "**No RL method beats SFT by more than 2 standard errors in this run.**")]
    if zero_std is not None:
        lines += ["", f"GRPO's `frac_reward_zero_std` (groups of {plan['grpo']['num_generations']} "
                  f"whose rewards are all equal, so all advantages 0): {zero_std['first']:.2f} at the "
                  f"first step, {zero_std['last']:.2f} at the last, {zero_std['mean']:.2f} on average."]
    if plot is not None:
        lines += ["", "![pass@1 against digits](accuracy.png)"]
    lines += ["", "## Samples (first sample of a few held-out prompts)", "", "| policy | prompt | answer | right |",
              "|---|---|---|---|"]
    for name, ev in evals.items():
        for p, y in ev["shown"]:
            lines.append(f"| {name} | `{p}` | `{y!r}` | {'✓' if reward(p, y) == 1 else ''} |")
    lines += ["", "## Settings and times", "", "| stage | settings |", "|---|---|"]
    for stage, settings in plan.items():
        lines.append(f"| {stage} | " + ", ".join(f"{key}={v}" for key, v in settings.items()) + " |")
    lines += ["", "| stage | seconds | |", "|---|---|---|"]
    for name in stages.ran + stages.reused:
        lines.append(f"| {name} | {stages.times.get(name, 0):.0f} | "
                     f"{'reused' if name in stages.reused else 'ran'} |")
    lines.append(f"| this run | {seconds:.0f} | |")
    tmp = out / "report.md.tmp"
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, out / "report.md")

    summary = {"task": "addition", "pass": {n: {str(d): v for d, v in tb.items()} for n, tb in tables.items()},
               "gain": gains, "beats_sft_by_2se": beats, "best": best,
               "frac_reward_zero_std": zero_std, "seconds": seconds}
    write_json(out / "summary.json", summary)
    return summary

