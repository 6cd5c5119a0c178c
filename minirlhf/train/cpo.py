"""CPO and SimPO: preference pairs with no reference model (`minirlhf.preference.cpo_loss`).

    CPO    L = mean ℓ(β·(s_w - s_l)) + α·NLL(y_w)                  s = summed log-probs
    SimPO  L = -mean log σ(β·(s_w/n_w - s_l/n_l) - γ)                n = completion lengths

Without p_ref nothing holds the policy near where it started: CPO leans on the NLL of the chosen,
SimPO on the length normalisation and on stopping in time (its loss has no finite minimum: the
audit, `minirlhf.audit`, measures how far it goes). ``minirlhf simpo`` is ``minirlhf cpo
--loss-type simpo --cpo-alpha 0`` with SimPO's paper defaults (β = 2, γ = 0.5).
"""

from dataclasses import dataclass

from ..preference import CPO_LOSS_TYPES, cpo_loss
from .common import option
from .dpo import train_pairs
from .preference import PreferenceConfig, check_preference
from .run import Run


@dataclass
class CPOConfig(PreferenceConfig):
    out_dir: str = option("runs/cpo", "where metrics.jsonl and ckpt.npz go")
    beta: float = option(0.1, "β: the scale of the implicit reward")
    loss_type: str = option("sigmoid", "sigmoid (CPO), hinge, ipo or simpo", choices=list(CPO_LOSS_TYPES))
    label_smoothing: float = option(0.0, "the assumed rate of flipped labels (sigmoid, simpo)")
    cpo_alpha: float = option(1.0, "weight of the NLL of the chosen completions")
    simpo_gamma: float = option(0.5, "SimPO's target margin γ (loss_type simpo)")


@dataclass
class SimPOConfig(PreferenceConfig):
    out_dir: str = option("runs/simpo", "where metrics.jsonl and ckpt.npz go")
    beta: float = option(2.0, "β: the scale of the length-normalised reward")
    gamma: float = option(0.5, "γ: the target margin of the reward, inside the logit")
    label_smoothing: float = option(0.0, "the assumed rate of flipped labels")
    cpo_alpha: float = option(0.0, "weight of the NLL of the chosen completions (CPO-SimPO)")


def cpo(cfg):
    """Train a policy with CPO (or, ``loss_type="simpo"``, SimPO) on preference pairs; returns
    {"checkpoint", metrics...}. Running it again with the same ``out_dir`` goes on (`Run`)."""
    return _run(cfg, "cpo", cfg.loss_type, cfg.simpo_gamma)


def simpo(cfg):
    """Train a policy with SimPO on preference pairs; as `cpo`."""
    return _run(cfg, "simpo", "simpo", cfg.gamma)


def _run(cfg, stage, loss_type, gamma):
    check_preference(cfg)

    def pair_loss(idx, pi_c, pi_r, ref_c, ref_r, n_c, n_r):          # no reference: ref_* are None
        return cpo_loss(pi_c, pi_r, n_c, n_r, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                        cpo_alpha=cfg.cpo_alpha, loss_type=loss_type, simpo_gamma=gamma)

    with Run(cfg, stage) as run:
        return run.result if run.finished else train_pairs(cfg, run, pair_loss, reference=False)
