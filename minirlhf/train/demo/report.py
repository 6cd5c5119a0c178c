"""The demo's report: report.md (the tables, the verdict, the plots, samples, settings and times)
and summary.json."""

import math
import os

import numpy as np

from ... import kernels
from .family import family_verdicts
from . import bon as demo_bon
from .plan import beta_name, read_metrics, write_json
from .plots import make_plots


def write_report(out, plan, cfg, evals, stages, seconds, bon_table=None):
    """report.md (tables, verdict, plots, samples, settings, times) and summary.json; with
    ``bon_table`` (`demo.bon.run_bon`), the best-of-n section and plot too."""
    base = evals["SFT"]
    policies = [n for n in evals if n not in ("reward",)]
    rows, verdicts = [], {}
    for name in policies:
        ev = evals[name]
        if name == "SFT":
            gain_text = "—"
        else:
            gain, se = _gain(ev, base)
            ok = gain > 2 * se
            kind = name.split()[0]
            verdicts.setdefault(kind, []).append((ok, name, gain, se, ev["kl"]))
            gain_text = f"{gain:+.3f} ± {se:.3f}" + (" ✓" if ok else "")
        rows.append(f"| {name} | {ev['gold']:.3f} ± {ev['gold_se']:.3f} | {gain_text} | "
                    f"{ev['rm']:.3f} | {ev['kl']:.2f} ± {ev['kl_se']:.2f} | {ev['length']:.1f} |")

    rm = evals["reward"]
    met = {kind: [v for v in vs if v[0]] for kind, vs in verdicts.items()}
    required = ["RL", "DPO"] + [k for k in ("PPO", "GRPO") if k in verdicts]
    target_met = bool(verdicts) and all(met.get(k) for k in required)
    lab = plan["labels"]
    all_stages = sum(stages.times.get(name, 0) for name in stages.ran + stages.reused)
    lines = [
        "# minirlhf demo report", "",
        f"Preset **{'smoke' if cfg.smoke else cfg.preset}**, seed {cfg.seed}, device {cfg.device}. "
        f"All stages took {all_stages:.0f} s of wall time as each was measured when it ran; this "
        f"run took {seconds:.0f} s"
        + (f" (it reused: {', '.join(stages.reused)})" if stages.reused else "")
        + f". {_threads_note()}", "",
        "## Result", "",
        f"Gold reward (the hidden sentiment score, R_gold = #positive - #negative words, "
        f"`minirlhf.gold`) of replies to {base['n'] // plan['eval']['samples_per_prompt']} held-out "
        f"prompts, {plan['eval']['samples_per_prompt']} samples each ({base['n']} replies per "
        f"policy, sampled at temperature 1). Gain: over SFT, ± the standard error of the "
        f"difference; ✓ marks a gain of more than two standard errors. KL: KL(p_θ ‖ p_sft) in nats "
        f"per reply, the mean over the policy's samples of log p_θ(y|x) - log p_sft(y|x). "
        f"The reward model and DPO learned from {_count_lines(out / 'labels' / 'prefs_train.jsonl')} "
        f"preference pairs: two SFT replies to each of {lab['prompts']} training prompts, the first "
        f"preferred with probability σ(ΔR_gold/τ), τ = {lab['temperature']:g}"
        + (", pairs the labeler called a tie (equal gold rewards) left out." if lab["drop_ties"]
           else "; ties were coin flips.") + " RL, PPO, DPO and GRPO start from the SFT "
        "model, their reference.", "",
        "| policy | gold reward ± se | gain over SFT | reward model | KL to SFT | reply length |",
        "|---|---|---|---|---|---|", *rows, "",
        f"Reward model: on {rm['pairs']} held-out preference pairs it orders "
        f"{_fmt(rm['agreement'])} of the {rm['pairs_counted']} pairs whose gold rewards differ as the "
        f"gold reward does (ties left out), and agrees with {_fmt(rm['label_accuracy'])} of the "
        f"labeler's (noisy) choices.", "",
    ]
    lines.append(f"**Target** ({', '.join(required)} each raise the mean gold reward over SFT by more "
                 f"than two standard errors): **{'met' if target_met else 'not met'}**.")
    for kind in ("RL", "PPO", "DPO", "GRPO"):
        vs = verdicts.get(kind, [])
        if not vs:
            continue
        good = [v for v in vs if v[0]]
        if good:
            _, name, gain, se, kl = min(good, key=lambda v: v[4])
            _, best, best_gain, best_se, best_kl = max(good, key=lambda v: v[2])
            lines.append(f"- {kind}: yes, at {len(good)} of {len(vs)} β values; at the smallest KL, "
                         f"{name}: {gain:+.3f} ± {se:.3f} at KL {kl:.2f} nats"
                         + (f"; the largest gain, {best}: {best_gain:+.3f} ± {best_se:.3f} at KL "
                            f"{best_kl:.2f} nats" if best != name else "") + ".")
        else:
            _, name, gain, se, kl = max(vs, key=lambda v: v[2])
            lines.append(f"- {kind}: no; the best, {name}, gains {gain:+.3f} ± {se:.3f} at KL "
                         f"{kl:.2f} nats.")
    lines += family_verdicts(verdicts) + [""]

    fits = demo_bon.gao_fits(bon_table, evals) if bon_table else None
    if bon_table:
        lines += demo_bon.report_lines(bon_table, fits)
    plots = make_plots(out, plan, evals, policies, bon_table, fits)
    lines += ["## Plots", ""]
    if plots is None:
        lines += ["matplotlib is not installed, so no plots were drawn (`pip install matplotlib`, "
                  "then run the demo again: it reuses every finished stage).", ""]
    else:
        lines += [f"![gold reward against KL]({plots[0]})", "",
                  "Gold reward against KL to the SFT model, one point per β (error bars: ± one "
                  "standard error): the reward-KL frontier.", "",
                  f"![gold and reward-model reward during RL]({plots[1]})", "",
                  "The reward model's score (what RL maximises) and the gold reward (what we want) of "
                  "each RL step's samples: where the first climbs and the second does not, the policy "
                  "over-optimises the proxy.", ""]
        if len(plots) > 2:
            lines += [f"![best-of-n against RL]({plots[2]})", "",
                      "Gains over the start in gold reward (left) and reward-model reward (right) "
                      "against sqrt(KL): best-of-n for n = 1 … 64, the RL-trained policies as points, "
                      "Gao et al.'s forms fitted (dashed). Where the proxy's curve keeps rising and "
                      "the gold one flattens or falls, the policy over-optimises the reward model.", ""]

    lines += ["## Training", "", "| stage | held-out measure | value |", "|---|---|---|"]
    for stage, folder, key, what in (
            ("pretrain", "pretrain", "val_loss", "loss on the last plays, nats/byte"),
            ("SFT", "sft", "val_loss", "loss on held-out replies, nats/byte")):
        value = _last(out / folder, key)
        lines.append(f"| {stage} | {what} | {_fmt(value)} |")
    lines += ["", "Implicit reward models: a policy p_θ trained towards the KL-regularised optimum "
              "p* ∝ p_sft·exp(R/β) carries the reward β·log(p_θ(y|x)/p_sft(y|x)). How often it "
              f"orders the {rm['pairs_counted']} held-out pairs as gold does (the reward model: "
              f"{_fmt(rm['agreement'])}):", "", "| policy | implicit-reward agreement with gold |",
              "|---|---|"]
    for name in policies:
        if evals[name].get("implicit_agreement") is not None:
            lines.append(f"| {name} | {_fmt(evals[name]['implicit_agreement'])} |")
    lines.append("")

    lines += ["## RL, PPO and GRPO: reward model against gold during training", "",
              "| run | steps | RM reward: first 10 → last 10 steps | gold: first 10 → last 10 steps | "
              "KL at the end |", "|---|---|---|---|---|"]
    # GRPO logs its k3 KL only when β > 0 (at β = 0 the loss has no reference): "—" there
    for kind, reward_key, kl_key in (("rl", "reward", "kl"), ("ppo", "objective/scores", "objective/kl"),
                                     ("grpo", "reward", "kl")):
        for beta in plan[kind]["betas"]:
            m = read_metrics(out / f"{kind}_beta{beta_name(beta)}")
            if not m:
                continue
            head, tail = m[:10], m[-10:]
            mean = lambda rows, k: float(np.mean([r[k] for r in rows]))  # noqa: E731
            lines.append(f"| {kind.upper()} β={beta_name(beta)} | {len(m)} | "
                         f"{mean(head, reward_key):.3f} → {mean(tail, reward_key):.3f} | "
                         f"{mean(head, 'gold'):.3f} → {mean(tail, 'gold'):.3f} | "
                         + (f"{mean(tail, kl_key):.2f} |" if kl_key in m[-1] else "— |"))
    lines.append("")

    lines += ["## Replies before and after", "",
              "The first sample of each policy for the same held-out prompts (newlines shown as /; "
              "a long prompt is cut from the left to fit the context).", ""]
    for i in range(min(plan["eval"]["shown"], len(base["samples"]))):
        lines += [f"**Prompt {i + 1}:** `{_one_line(base['samples'][i]['prompt'], 100)}`", "",
                  "| policy | reply | gold |", "|---|---|---|"]
        for name in policies:
            s = evals[name]["samples"][i]
            lines.append(f"| {name} | {_one_line(s['reply'])} | {s['gold']:+.0f} |")
        lines.append("")

    lines += ["## Settings", "", "```"]
    for stage, settings in plan.items():
        lines.append(f"{stage:<9} " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    lines += ["```", "", "## Times", "", "| stage | seconds |", "|---|---|"]
    for name, secs in stages.times.items():
        lines.append(f"| {name} | {secs:.1f}{' (reused)' if name in stages.reused else ''} |")
    lines += [f"| **all stages** | {all_stages:.0f} |", f"| this run | {seconds:.0f} |", ""]

    report = out / "report.md"
    tmp = report.with_name("report.md.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, report)

    summary = {"target_met": target_met, "seconds": seconds, "reused": stages.reused,
               "ran": stages.ran, "reward_agreement": rm["agreement"],
               "policies": {n: {k: evals[n][k] for k in ("gold", "gold_se", "rm", "kl", "kl_se")}
                            for n in policies}}
    if bon_table:
        summary["bon"], summary["gao_fits"] = bon_table, fits
    write_json(out / "summary.json", summary)
    return summary


# ----- small helpers ---------------------------------------------------------------------------

def _fmt(x, digits=3):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _one_line(text, width=70):
    text = text.strip().replace("\n", " / ")
    text = text.replace("|", "\\|")
    return text if len(text) <= width else text[:width - 1] + "…"


def _gain(ev, base):
    """The gain in mean gold reward over SFT and its standard error (the two samples independent)."""
    gain = ev["gold"] - base["gold"]
    se = math.sqrt(ev["gold_se"] ** 2 + base["gold_se"] ** 2)
    return gain, se


def _last(folder, key):
    """The last logged value of ``key`` in a run's metrics.jsonl, or None."""
    values = [r[key] for r in read_metrics(folder) if key in r]
    return float(values[-1]) if values else None


def _count_lines(path):
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def _threads_note():
    """The thread settings, which change CPU timings a lot on a busy machine."""
    names = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    set_ = [f"{n}={os.environ[n]}" for n in names if n in os.environ]
    blas = f"BLAS threads: {', '.join(set_)}" if set_ else "BLAS threads: the library's default"
    return f"{blas}; minirlhf threads: {kernels.get_num_threads()}; {os.cpu_count()} CPUs."
