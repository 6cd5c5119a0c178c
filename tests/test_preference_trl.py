"""OPTIONAL: the preference family equals TRL 1.16's own code on random batches (skips without trl).

TRL's loss lines are called as they are: `DPOTrainer._compute_loss` and `KTOTrainer._compute_loss`
on a stand-in ``self`` (the trainer's settings, an identity accelerator) and a stand-in model that
returns given per-token log-probs, `CPOTrainer.cpo_loss` and `ORPOTrainer.odds_ratio_loss` on the
per-sequence log-probs. Values, gradients (TRL's by torch autograd) and metrics must agree with ours
in float64. The same numbers are checked without torch in tests/test_preference.py.
"""

from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")
kto_trainer = pytest.importorskip("trl.trainer.kto_trainer")
cpo_trainer = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
orpo_trainer = pytest.importorskip("trl.experimental.orpo.orpo_trainer")

import minirlhf as mr                                                    # noqa: E402
import minirlhf.functional as F                                          # noqa: E402
from minirlhf import preference                                          # noqa: E402
from minirlhf.losses import cpo_loss, dpo_loss, kto_loss, orpo_loss      # noqa: E402

TOL = dict(rtol=1e-11, atol=1e-13)


class Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x

    gather = gather_for_metrics


class FakeModel:
    """Returns the given per-token log-probs (and zeros for what only TRL's logging reads)."""

    training = True

    def __init__(self, per_token, kl_ids=None, kl_per_token=None):
        self.per_token, self.kl_ids, self.kl_per_token = per_token, kl_ids, kl_per_token

    def __call__(self, input_ids, labels=None, **kwargs):
        lp = self.kl_per_token if input_ids is self.kl_ids else self.per_token
        zeros = torch.zeros_like(lp)
        return SimpleNamespace(log_probs=lp, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def stand_in(trainer_cls, model, **settings):
    """An object whose methods are the trainer's and whose attributes are the given settings."""
    methods = {k: v for k, v in vars(trainer_cls).items() if callable(v) and not k.startswith("__")}
    stub = type("Stub", (), methods)()
    stub.__dict__.update(model=model, accelerator=Accelerator(), aux_loss_enabled=False,
                         precompute_ref_logps=True, _metrics={"train": defaultdict(list)},
                         _total_train_tokens=0, _tp_size=1, **settings)
    return stub


def token_batch(rng, B, T=7):
    """Per-token log-probs (B, T-1) of completions that start after a one-token prompt."""
    lengths = rng.integers(1, T, B)
    mask = np.zeros((B, T), dtype=np.int64)
    for b, n in enumerate(lengths):
        mask[b, 1:1 + n] = 1
    per_token = np.where(mask[:, 1:] == 1, -rng.uniform(0.05, 1.5, (B, T - 1)), 0.0)
    return per_token, mask, lengths.astype(float)


# ===================================================================================================
# DPO's loss types


DPO_SETTINGS = [([t], None, 0.0) for t in preference.DPO_LOSS_TYPES if t not in ("exo_pair", "sigmoid")]
DPO_SETTINGS += [(["sigmoid"], None, 0.0), (["exo_pair"], None, 1e-3), (["robust"], None, 0.2),
                 (["aot"], None, 0.1), (["aot_unpaired"], None, 0.1),
                 (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], 0.0),
                 (["ipo", "sigmoid_norm", "apo_down"], [1.0, -0.5, 2.0], 0.0)]


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("types, weights, eps", DPO_SETTINGS,
                         ids=["+".join(s[0]) + (f"_eps{s[2]}" if s[2] else "") for s in DPO_SETTINGS])
def test_dpo_loss_types_equal_trls_compute_loss(types, weights, eps, seed):
    rng = np.random.default_rng(seed)
    B, beta, tau = 5, 0.6, 0.3
    per_token, mask, lengths = token_batch(rng, 2 * B)
    ref = per_token.sum(1) + rng.normal(0, 1.0, 2 * B)

    leaf = torch.tensor(per_token, requires_grad=True)
    model = FakeModel(leaf)
    trl = stand_in(dpo_trainer.DPOTrainer, model, ld_alpha=None, f_divergence_type="reverse_kl",
                   loss_types=types, loss_weights=weights or [1.0] * len(types), beta=beta,
                   label_smoothing=eps, use_weighting=False,
                   args=SimpleNamespace(discopop_tau=tau, gradient_checkpointing_kwargs=None))
    inputs = {"input_ids": torch.zeros(mask.shape, dtype=torch.long),
              "attention_mask": torch.ones(mask.shape), "completion_mask": torch.tensor(mask), "ref_chosen_logps": torch.tensor(ref[:B]),
              "ref_rejected_logps": torch.tensor(ref[B:])}
    trl_loss = trl._compute_loss(model, inputs, return_outputs=False)
    trl_loss.backward()

    sums = per_token.sum(1)
    pc, pr = mr.tensor(sums[:B], requires_grad=True), mr.tensor(sums[B:], requires_grad=True)
    loss, metrics = dpo_loss(pc, pr, ref[:B], ref[B:], beta=beta, label_smoothing=eps,
                             loss_type=types, loss_weights=weights, chosen_lengths=lengths[:B],
                             rejected_lengths=lengths[B:], discopop_tau=tau)
    # TRL's exo_pair takes log ε and log(1 - ε) of a float32 tensor: equal up to that rounding
    tol = dict(rtol=1e-6, atol=1e-12) if "exo_pair" in types else TOL
    np.testing.assert_allclose(loss.item(), trl_loss.item(), **tol)
    loss.backward()
    ours = np.concatenate([pc.grad, np.zeros(B) if pr.grad is None else pr.grad])
    # every completion token of sequence b gets d loss / d log p(y_b)
    np.testing.assert_allclose(leaf.grad.numpy()[mask[:, 1:] == 1],
                               np.repeat(ours, mask[:, 1:].sum(1)), **tol)
    for k, v in metrics.items():                       # TRL counts accuracies in float32
        tol = dict(rtol=1e-7) if k == "rewards/accuracies" else TOL
        np.testing.assert_allclose(v, trl._metrics["train"][k][-1], err_msg=k, **tol)


# ===================================================================================================
# KTO and APO-zero (unpaired)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("loss_type, kinds", [("kto", "both"), ("kto", "good"), ("kto", "bad"),
                                              ("apo_zero_unpaired", "both")])
def test_kto_equals_trls_compute_loss(loss_type, kinds, seed):
    rng = np.random.default_rng(seed)
    B, beta, wd, wu = 6, 0.3, 1.2, 0.8
    per_token, mask, _ = token_batch(rng, B)
    kl_per_token, kl_mask, _ = token_batch(rng, B)
    ref, ref_kl = per_token.sum(1) + rng.normal(0, 1, B), kl_per_token.sum(1) + rng.normal(0.5, 1, B)
    good = rng.random(B) < 0.5
    good[:2] = [True, False]
    if kinds != "both":
        good[:] = kinds == "good"

    leaf = torch.tensor(per_token, requires_grad=True)
    kl_ids = torch.zeros(kl_mask.shape, dtype=torch.long)
    model = FakeModel(leaf, kl_ids, torch.tensor(kl_per_token))
    trl = stand_in(kto_trainer.KTOTrainer, model, beta=beta, loss_type=loss_type,
                   desirable_weight=wd, undesirable_weight=wu,
                   calculate_KL=loss_type == "kto")
    batch = {"label": torch.tensor(good), "input_ids": torch.zeros(mask.shape, dtype=torch.long),
             "attention_mask": torch.ones(mask.shape), "completion_mask": torch.tensor(mask),
             "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones(kl_mask.shape),
             "KL_completion_mask": torch.tensor(kl_mask), "ref_logps": torch.tensor(ref),
             "ref_KL_logps": torch.tensor(ref_kl)}
    trl_loss = trl._compute_loss(model, batch, return_outputs=False)
    trl_loss.backward()

    logps = mr.tensor(per_token.sum(1), requires_grad=True)
    kl = kl_per_token.sum(1) - ref_kl                  # log-ratios of the mismatched pairs
    loss, metrics = kto_loss(logps, ref, good, kl, beta=beta, desirable_weight=wd,
                             undesirable_weight=wu, loss_type=loss_type)
    np.testing.assert_allclose(loss.item(), trl_loss.item(), **TOL)
    loss.backward()
    np.testing.assert_allclose(leaf.grad.numpy()[mask[:, 1:] == 1],
                               np.repeat(logps.grad, mask[:, 1:].sum(1)), **TOL)
    logged = {k: v[-1] for k, v in trl._metrics["train"].items()
              if k.startswith(("rewards/", "logps/", "kl"))}
    assert metrics.keys() == logged.keys()
    for k, v in metrics.items():
        np.testing.assert_allclose(v, logged[k], err_msg=k, **TOL)


# ===================================================================================================
# CPO / SimPO and ORPO


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("loss_type, eps, alpha", [("sigmoid", 0.0, 1.0), ("sigmoid", 0.1, 0.0),
                                                   ("hinge", 0.0, 1.0), ("ipo", 0.0, 0.5),
                                                   ("simpo", 0.0, 0.0), ("simpo", 0.2, 1.0)])
def test_cpo_and_simpo_equal_trls_cpo_loss(loss_type, eps, alpha, seed):
    rng = np.random.default_rng(seed)
    B, V, T, beta, gamma = 4, 5, 6, 2.0 if loss_type == "simpo" else 0.3, 0.7
    logits = torch.tensor(rng.normal(0, 2, (2 * B, T, V)), requires_grad=True)
    labels = torch.tensor(rng.integers(0, V, (2 * B, T)))
    _, mask, lengths = token_batch(rng, 2 * B, T)
    labels[torch.tensor(mask) == 0] = -100

    # TRL: the summed (or, for ipo and simpo, averaged) log-probs, cpo_loss, + α · CE on the chosen
    get = cpo_trainer.CPOTrainer.get_batch_logps
    all_logps = get(logits, labels, average_log_prob=loss_type in ("ipo", "simpo"))
    trl = stand_in(cpo_trainer.CPOTrainer, None, alpha=0.0, beta=beta, loss_type=loss_type,
                   simpo_gamma=gamma, label_smoothing=eps)
    losses, r_w, r_l = trl.cpo_loss(all_logps[:B], all_logps[B:])
    nll = torch.nn.CrossEntropyLoss()(logits[:B, :-1].reshape(-1, V), labels[:B, 1:].reshape(-1))
    trl_loss = losses.mean() + alpha * nll

    sums = get(logits, labels).detach().numpy()
    pc, pr = mr.tensor(sums[:B], requires_grad=True), mr.tensor(sums[B:], requires_grad=True)
    loss, metrics = cpo_loss(pc, pr, lengths[:B], lengths[B:], beta=beta, label_smoothing=eps,
                             cpo_alpha=alpha, loss_type=loss_type, simpo_gamma=gamma)
    np.testing.assert_allclose(loss.item(), trl_loss.item(), **TOL)
    np.testing.assert_allclose(metrics["nll_loss"], nll.item() if alpha else 0.0, **TOL)
    np.testing.assert_allclose(metrics["rewards/chosen"], r_w.mean().item(), **TOL)
    np.testing.assert_allclose(metrics["rewards/margins"], (r_w - r_l).mean().item(), **TOL)
    np.testing.assert_allclose(metrics["logps/rejected"], all_logps[B:].mean().item(), **TOL)

    # gradients: TRL's reach the logits through the log-probs; ours, chained the same way
    loss.backward()
    s = torch.tensor(np.concatenate([pc.grad, pr.grad]))
    torch.autograd.backward([get(logits, labels)], [s])
    ours = logits.grad.clone()
    logits.grad = None
    trl_loss.backward()
    np.testing.assert_allclose(ours.numpy(), logits.grad.numpy(), **TOL)


F32 = dict(rtol=2e-6, atol=1e-7)         # ORPOTrainer casts the log-probs to float32 first


def test_log1mexp_equals_trls_in_float64():
    a = -np.concatenate([[1e-12, 1e-6, 0.6931471805599453, 80.0], np.geomspace(1e-8, 50, 40)])
    at = torch.tensor(a, requires_grad=True)
    orpo_trainer.log1mexp(at).sum().backward()
    x = mr.tensor(a, requires_grad=True)
    y = F.log1mexp(x)
    y.sum().backward()
    np.testing.assert_allclose(y.numpy(), orpo_trainer.log1mexp(at).detach().numpy(), rtol=1e-15)
    np.testing.assert_allclose(x.grad, at.grad.numpy(), rtol=1e-13)


@pytest.mark.parametrize("seed", range(3))
def test_orpo_equals_trls_odds_ratio_loss(seed):
    rng = np.random.default_rng(seed)
    B, beta = 6, 0.2
    # near 0 and far below (in float32 TRL's own gradient is already nan at a = -1e-9)
    a = -np.concatenate([[1e-4, 80.0], rng.uniform(0.01, 4.0, 2 * B - 2)])
    rng.shuffle(a)
    nll_value = float(rng.uniform(0.5, 2))
    a_w_t, a_l_t = (torch.tensor(x, requires_grad=True) for x in (a[:B], a[B:]))
    nll_t = torch.tensor(nll_value, requires_grad=True)
    trl = stand_in(orpo_trainer.ORPOTrainer, None, beta=beta)
    losses, r_w, r_l, log_odds_ratio, log_odds_chosen = trl.odds_ratio_loss(a_w_t, a_l_t)
    trl_loss = nll_t - losses.mean()
    trl_loss.backward()

    a_w, a_l = mr.tensor(a[:B], requires_grad=True), mr.tensor(a[B:], requires_grad=True)
    nll = mr.tensor(np.array(nll_value), requires_grad=True)
    loss, metrics = orpo_loss(a_w, a_l, nll, beta=beta)
    loss.backward()
    np.testing.assert_allclose(loss.item(), trl_loss.item(), **F32)
    np.testing.assert_allclose(a_w.grad, a_w_t.grad.numpy(), **F32)
    np.testing.assert_allclose(a_l.grad, a_l_t.grad.numpy(), **F32)
    assert nll.grad == nll_t.grad.item() == 1.0
    np.testing.assert_allclose(metrics["log_odds_ratio"], log_odds_ratio.item(), **F32)
    np.testing.assert_allclose(metrics["log_odds_chosen"], log_odds_chosen.item(), **F32)
    np.testing.assert_allclose(metrics["rewards/accuracies"], (r_w > r_l).double().mean().item())


def test_orpo_at_a_certain_chosen_is_finite_here_where_trls_gradient_is_not():
    """The one place we depart from TRL on purpose: a_w = 0 gives TRL a nan gradient (0·inf)."""
    a_w_t = torch.tensor([0.0, -0.5], dtype=torch.float64, requires_grad=True)
    a_l_t = torch.tensor([-0.7, -1.0], dtype=torch.float64)
    trl = stand_in(orpo_trainer.ORPOTrainer, None, beta=1.0)
    losses = trl.odds_ratio_loss(a_w_t, a_l_t)[0]
    (-losses.mean()).backward()
    a_w = mr.tensor(a_w_t.detach().numpy(), requires_grad=True)
    loss, _ = orpo_loss(a_w, mr.tensor(a_l_t.numpy()), 0.0, beta=1.0)
    loss.backward()
    np.testing.assert_allclose(loss.item(), -losses.mean().item(), **F32)
    assert np.isfinite(a_w.grad).all()
    np.testing.assert_allclose(a_w.grad[1], a_w_t.grad[1].item(), **F32)
    assert not np.isfinite(a_w_t.grad[0].item())
