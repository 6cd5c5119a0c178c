"""ORPO: SFT and preference in one loss, no reference model (`minirlhf.preference.orpo_loss`).

On the average per-token log-probs a = s/n of the chosen and the rejected completion,

    L = NLL(y_w) - β·mean log σ(log odds(a_w) - log odds(a_l)),     odds(a) = e^a / (1 - e^a)

with NLL(y_w) the mean over every chosen token of the batch, as TRL's ORPOTrainer computes it: one
stage that teaches the chosen completions and pushes their odds above the rejected ones'.
"""

from dataclasses import dataclass

from ..preference import orpo_loss
from .common import option
from .dpo import train_pairs
from .preference import PreferenceConfig, check_preference
from .run import Run


@dataclass
class ORPOConfig(PreferenceConfig):
    out_dir: str = option("runs/orpo", "where metrics.jsonl and ckpt.npz go")
    beta: float = option(0.1, "β (the paper's λ): the weight of the odds-ratio term")


def orpo(cfg):
    """Train a policy with ORPO on preference pairs; returns {"checkpoint", metrics...}.

    Running it again with the same ``out_dir`` goes on from the last checkpoint (`Run`).
    """
    check_preference(cfg)

    def pair_loss(idx, pi_c, pi_r, ref_c, ref_r, n_c, n_r):          # no reference: ref_* are None
        chosen_nll = -pi_c.sum() / float(n_c.sum())                    # token mean over y_w
        return orpo_loss(pi_c / n_c, pi_r / n_r, chosen_nll, beta=cfg.beta)

    with Run(cfg, "orpo") as run:
        return run.result if run.finished else train_pairs(cfg, run, pair_loss, reference=False)
