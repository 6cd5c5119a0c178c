"""KTO: thumbs-up / thumbs-down examples instead of pairs (`minirlhf.preference.kto_loss`).

Each example is a prompt, a completion and a label (desirable or not), TRL's unpaired format
``{"prompt", "completion", "label"}``; a pairs file is split into one desirable and one undesirable
example per pair (`minirlhf.datasets.unpair_preferences`, as TRL's ``unpair_preference_dataset``).
With r = log p_θ(y|x) - log p_ref(y|x) and z0 = max(0, mean r of mismatched pairs),

    desirable:  λ_D·(1 - σ(β·(r - z0)))        undesirable:  λ_U·(1 - σ(β·(z0 - r)))

The mismatched pair of each example is its prompt with the completion of the example before it,
rotating within each run of ``batch_size`` consecutive examples of the file, as TRL builds them
before shuffling (`minirlhf.preference.kto_mismatched_pairs`); z0 is the mean over the batch's own
mismatched pairs, their log-probs taken without gradient, as TRL does. DPO's loop
(`minirlhf.train.dpo.train_pairs`) runs it: each example and its mismatched pair are its two rows.
"""

from dataclasses import dataclass

import numpy as np

from ..datasets import Record, load_unpaired
from ..preference import kto_loss, kto_mismatched_pairs
from .common import option, require
from .dpo import train_pairs
from .preference import PreferenceConfig, check_preference
from .run import Run


@dataclass
class KTOConfig(PreferenceConfig):
    data: str = option("", "JSONL of {\"prompt\", \"completion\", \"label\": true/false} records, or "
                           "of {\"prompt\", \"chosen\", \"rejected\"} pairs", required=True)
    out_dir: str = option("runs/kto", "where metrics.jsonl and ckpt.npz go")
    beta: float = option(0.1, "β: the strength of the implicit KL penalty")
    desirable_weight: float = option(1.0, "λ_D: the weight of the desirable examples")
    undesirable_weight: float = option(1.0, "λ_U: the weight of the undesirable examples")
    batch_size: int = option(16, "examples per step (at least 2: each needs a mismatched pair)")
    val_fraction: float = option(0.1, "share of the examples held out to report val metrics")


def kto(cfg):
    """Train a policy with KTO on unpaired (or split) preference data; returns {"checkpoint", ...}.

    Running it again with the same ``out_dir`` goes on from the last checkpoint (`Run`).
    """
    require(cfg.batch_size >= 2, f"batch_size must be at least 2 for KTO, got {cfg.batch_size}: its "
                                 f"KL estimate pairs each prompt with another example's completion")
    check_preference(cfg)
    with Run(cfg, "kto") as run:
        if run.finished:
            return run.result
        examples = load_unpaired(cfg.data)
        other = kto_mismatched_pairs(len(examples), cfg.batch_size)
        records = [Record({**r, "kl_completion": examples[j]["completion"]}, line=r.line)
                   for r, j in zip(examples, other.tolist())]
        desirable = np.array([r["label"] for r in examples])

        def pair_loss(idx, pi, pi_kl, ref, ref_kl, n, n_kl):
            return kto_loss(pi, ref, desirable[idx], pi_kl.data - ref_kl, beta=cfg.beta,
                            desirable_weight=cfg.desirable_weight,
                            undesirable_weight=cfg.undesirable_weight)

        return train_pairs(cfg, run, pair_loss, records, fields=("completion", "kl_completion"),
                           detach_second=True, what="examples")
