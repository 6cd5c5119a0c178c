"""The demo's preference family beside DPO: KTO (the same pairs, unpaired), SimPO and ORPO, one
setting each (``plan["kto"]``, ``plan["simpo"]``, ``plan["orpo"]``), all from the SFT model on the
labeler's preferences; their rows in the report and their points on the frontier plot."""

from ..cpo import SimPOConfig, simpo
from ..kto import KTOConfig, kto
from ..orpo import ORPOConfig, orpo
from .plan import beta_name

# kind -> (its policies' name in the report, config class, trainer, frontier marker)
FAMILY = {"kto": ("KTO", KTOConfig, kto, "v"), "simpo": ("SimPO", SimPOConfig, simpo, "P"),
          "orpo": ("ORPO", ORPOConfig, orpo, "X")}


def train_family(out, plan, cfg, stages, prefs, sft_ckpt, policies, common):
    """Train each of `FAMILY` that the plan holds into ``out/<kind>`` and add it to ``policies``."""
    for kind, (label, config_cls, train, _) in FAMILY.items():
        if kind not in plan:
            continue
        run_cfg = config_cls(data=str(prefs), init=str(sft_ckpt), out_dir=str(out / kind),
                             **plan[kind], seed=cfg.seed, **common)
        ckpt = out / kind / "ckpt.npz"
        stages.run(kind, ckpt, lambda c=run_cfg, t=train: t(c), inputs=[sft_ckpt, prefs],
                   steps=run_cfg.max_steps)
        policies[f"{label} β={beta_name(run_cfg.beta)}"] = ckpt


def family_points(ax, evals, policies):
    """One marker per trained member of `FAMILY` on the frontier axes ``ax`` (gold against KL)."""
    for label, *_, marker in FAMILY.values():
        for name in (n for n in policies if n.startswith(label + " ")):
            ev = evals[name]
            ax.errorbar([ev["kl"]], [ev["gold"]], yerr=[ev["gold_se"]], fmt=marker, label=name,
                        capsize=3, markersize=8)


def family_verdicts(verdicts):
    """The report's lines for `FAMILY`: does each beat SFT's gold reward by more than two standard
    errors at its one setting? (Not part of the demo's target: the README says what would change a no.)"""
    lines = []
    for label, *_ in FAMILY.values():
        for ok, name, gain, se, kl in verdicts.get(label, []):
            lines.append(f"- {name}: {'yes' if ok else 'no'}, {gain:+.3f} ± {se:.3f} at KL {kl:.2f} nats"
                         + ("" if ok else " (not more than two standard errors)") + ".")
    return lines
