"""DPO: the shortcut that replaces steps 2 and 3 (reward model and RL) with one classification loss.

The KL-regularised optimum is p*(y|x) ∝ p_ref(y|x)·exp(R(y|x)/β), so R = β·log(p*/p_ref) + const(x).
Put that implicit reward into the Bradley-Terry likelihood of the preferences, and train p_θ directly:

    L_DPO(θ) = -E log σ(β·log(p_θ(y_w|x)/p_ref(y_w|x)) - β·log(p_θ(y_l|x)/p_ref(y_l|x)))

(`minirlhf.losses.dpo_loss`). p_ref is the frozen starting policy; its log-prob of each chosen and
rejected completion is computed once, when a batch first needs it (`ReferenceLogps`).
"""

from dataclasses import dataclass

import math

import numpy as np

from ..checkpoint import tokenizer_for
from ..datasets import Minibatches, collate, load_preferences
from ..logprobs import sequence_logprobs
from ..losses import dpo_loss
from ..optim import AdamW, lr_schedule, param_groups
from ..tensor import no_grad
from .common import (ConfigError, batch_tensor, check_common, config_summary, distinct_pairs,
                     encode_sequences, load_policy, option, require, split_holdout,
                     weighted_means)
from .preference import PreferenceConfig
from .run import Run


@dataclass
class DPOConfig(PreferenceConfig):   # data, batch_size, max_steps, lr, ...: the family's settings
    init: str = option("runs/sft/ckpt.npz", "the policy to start from; also the frozen reference p_ref")
    out_dir: str = option("runs/dpo", "where metrics.jsonl and ckpt.npz go")
    beta: float = option(0.1, "β: the strength of the implicit KL penalty")
    loss_type: str = option("sigmoid", "sigmoid (DPO), ipo, or any of TRL's loss types (hinge, robust, "
                            "exo_pair, nca_pair, bco_pair, sppo_hard, aot, apo_zero, ...); several "
                            "comma-separated (MPO)")
    loss_weights: str | None = option(None, "comma-separated weights, one per --loss-type (default: 1 each)")
    label_smoothing: float = option(0.0, "cDPO: the assumed rate of flipped labels, in [0, 0.5]")


def pair_logps(model, pairs, device):
    """log p(y_w|x) and log p(y_l|x) (each (B,)) of a batch of (chosen row, rejected row) pairs."""
    logp = rows_logps(model, [c for c, _ in pairs] + [r for _, r in pairs], device)   # (2B,)
    B = len(pairs)
    return logp[:B], logp[B:]


def rows_logps(model, rows, device):
    """log p(y|x) (B,) of ``(ids, n_prompt)`` rows: one padded batch through `sequence_logprobs`."""
    batch = collate(rows)
    return sequence_logprobs(model, batch_tensor(batch["input_ids"], device),
                             batch_tensor(batch["completion_mask"], device))[1]


def pair_lengths(pairs):
    """The completions' token counts (EOT included) of (chosen row, rejected row) pairs: two (B,)."""
    return tuple(np.array([len(row[k][0]) - row[k][1] for row in pairs], dtype=np.float64)
                 for k in (0, 1))


def loss_types(cfg):
    """``cfg.loss_type`` and ``cfg.loss_weights`` checked by `dpo_loss`'s own rules: the list of
    (name, weight), each refusal one line (`ConfigError`)."""
    from ..preference import dpo_loss_types

    weights = None
    if cfg.loss_weights is not None:
        try:
            weights = [float(w) for w in cfg.loss_weights.split(",")]
        except ValueError:
            raise ConfigError(f"loss_weights must be comma-separated numbers, got {cfg.loss_weights!r}") from None
        require(all(math.isfinite(w) for w in weights), f"loss_weights must be finite, got {cfg.loss_weights!r}")
    try:
        # lengths are the trainer's to give: claim them here so only the names and weights are judged
        return dpo_loss_types(cfg.loss_type, weights, cfg.label_smoothing,
                              {"chosen_lengths": 1, "rejected_lengths": 1})
    except ValueError as e:
        raise ConfigError(str(e).removeprefix("dpo_loss: ")) from None


def dpo_pair_loss(cfg):
    """``loss(pi_c, pi_r, ref_c, ref_r, n_c, n_r)`` of `dpo_loss` with the run's settings. The
    lengths go only to the types that need them (sft, sigmoid_norm): ipo keeps summed log-ratios."""
    from ..preference import NEED_LENGTHS

    types = loss_types(cfg)
    lengths = any(name in NEED_LENGTHS for name, _ in types)
    weights = None if cfg.loss_weights is None else [w for _, w in types]

    def loss(idx, pi_c, pi_r, ref_c, ref_r, n_c, n_r):
        return dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                        loss_type=cfg.loss_type, loss_weights=weights,
                        chosen_lengths=n_c if lengths else None, rejected_lengths=n_r if lengths else None)
    return loss


class ReferenceLogps:
    """log p_ref of the chosen and rejected completion of each pair, computed when a batch first needs
    them and kept. Pairs are scored in fixed chunks of ``batch_size`` (pairs 0..B-1, B..2B-1, ...), so
    a value never depends on which batch asked first: a resumed run reads the same numbers."""

    def __init__(self, ref, pairs, cfg):
        self.ref, self.pairs, self.cfg = ref, pairs, cfg
        self.chosen = np.full(len(pairs), np.nan)                          # (N,)
        self.rejected = np.full(len(pairs), np.nan)                        # (N,)

    def __call__(self, idx):
        """(chosen, rejected): two host arrays (len(idx),) for the pair indices ``idx``."""
        B = self.cfg.batch_size
        for chunk in sorted({i // B for i in idx.tolist() if np.isnan(self.chosen[i])}):
            lo, hi = chunk * B, min((chunk + 1) * B, len(self.pairs))
            with no_grad():
                c, r = pair_logps(self.ref, self.pairs[lo:hi], self.cfg.device)
            self.chosen[lo:hi], self.rejected[lo:hi] = c.numpy(), r.numpy()
        return self.chosen[idx], self.rejected[idx]


def dpo(cfg):
    """Train a policy with DPO on preference pairs; returns {"checkpoint", metrics...}.

    Running it again with the same ``out_dir`` goes on from the last checkpoint (`Run`).
    """
    check_common(cfg)
    require(0 <= cfg.label_smoothing <= 0.5, f"label_smoothing must be in [0, 0.5], got {cfg.label_smoothing}")
    loss = dpo_pair_loss(cfg)
    with Run(cfg, "dpo") as run:
        return run.result if run.finished else train_pairs(cfg, run, loss)


def train_pairs(cfg, run, pair_loss, records=None, fields=("chosen", "rejected"), reference=True,
                detach_second=False, what="pairs"):
    """The loop of every stage trained on two completions per record (dpo, cpo, simpo, orpo, kto):
    ``pair_loss(idx, pi_c, pi_r, ref_c, ref_r, n_c, n_r)`` of the record indices, the policy's summed
    log-probs of the two ``fields`` (Tensors; the second without gradient with ``detach_second``),
    the reference's (arrays; None when ``reference`` is False: no p_ref is loaded) and the lengths.
    ``records``: default the distinct preference pairs of ``cfg.data``."""
    if records is None:
        records = distinct_pairs(load_preferences(cfg.data), cfg.data, run.print)
    tokenizer = tokenizer_for(cfg.init)   # the one the model was trained with
    policy = load_policy(cfg.init, cfg.device)
    block = policy.config.block_size
    pairs = list(zip(*(encode_sequences(records, tokenizer, block, f, cfg.data) for f in fields)))
    train_idx, val_idx = split_holdout(range(len(pairs)), cfg.val_fraction, np.random.default_rng(cfg.seed))

    if reference:
        ref = load_policy(cfg.init, cfg.device)
        ref.eval()
        ref_logps = ReferenceLogps(ref, pairs, cfg)

    def loss_of(idx):
        idx = np.asarray(idx)
        batch = [pairs[i] for i in idx.tolist()]
        if detach_second:
            pi_c = rows_logps(policy, [c for c, _ in batch], cfg.device)
            with no_grad():
                pi_r = rows_logps(policy, [r for _, r in batch], cfg.device)
        else:
            pi_c, pi_r = pair_logps(policy, batch, cfg.device)
        ref_c, ref_r = ref_logps(idx) if reference else (None, None)       # (B,), (B,)
        return pair_loss(idx, pi_c, pi_r, ref_c, ref_r, *pair_lengths(batch))

    def evaluate():
        policy.eval()
        batches = [val_idx[i:i + cfg.batch_size] for i in range(0, len(val_idx), cfg.batch_size)]
        with no_grad():
            results = [loss_of(batch) for batch in batches]
        policy.train()
        return weighted_means([{"loss": loss.item(), **m} for loss, m in results],
                              [len(b) for b in batches])

    optimizer = AdamW(param_groups(policy, 0.0), lr=cfg.lr)
    start = run.restore(policy, optimizer)
    run.print(f"{run.stage}: {len(train_idx)} training and {len(val_idx)} held-out {what} from {cfg.data}\n"
              f"{config_summary(cfg)}")
    batches = Minibatches(train_idx, cfg.batch_size, seed=cfg.seed)
    val = {k[4:]: v for k, v in run.last.items() if k.startswith("val_")}
    for step in run.steps(start):
        optimizer.lr = lr_schedule(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.lr / 10)
        loss_t, metrics = loss_of(batches[step - 1])
        loss, grad_norm = run.update(loss_t)
        row = {"loss": loss, **metrics, "lr": optimizer.lr, "grad_norm": grad_norm}
        if val_idx and (step % cfg.eval_interval == 0 or step == cfg.max_steps):
            val = evaluate()
            row.update({f"val_{k}": v for k, v in val.items()})
        run.log(step, row)
        run.save_if_due(step)
    last = {k: v for k, v in run.last.items() if k not in ("step", "time") and not k.startswith("val_")}
    accuracy = last.get("rewards/accuracies")
    return run.finish({**last, "val": val}, f"loss {last['loss']:.4f}" + (
        f", reward accuracy {accuracy:.3f}" if accuracy is not None else f", kl {last.get('kl')}"))
