"""The preference family (minirlhf/preference.py) equals plain NumPy written from TRL 1.16's lines.

Each row of `CASES` is one loss: our function on Tensors and a NumPy function written from the lines
of TRL's trainer that compute it (dpo_trainer.py `_compute_loss`, kto_trainer.py `_compute_loss`,
cpo_trainer.py `cpo_loss`, orpo_trainer.py `odds_ratio_loss`). On random batches the two agree in
value, in every metric, and in gradient (ours by backward, NumPy's by central differences), and
`mr.gradcheck` accepts each backward. tests/test_preference_trl.py runs TRL's own code beside them.
"""

import subprocess
import sys
from typing import Callable, NamedTuple

import numpy as np
import pytest

import minirlhf as mr
import minirlhf.functional as F
from minirlhf import preference
from minirlhf.losses import (apo_zero_unpaired, cpo_loss, dpo_loss, kto_loss, kto_mismatched_pairs,
                             orpo_loss, simpo_loss)

# ===================================================================================================
# NumPy from TRL's lines


def np_logsigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_log1mexp(x):
    return np.where(x < -0.6931471805599453, np.log1p(-np.exp(x)), np.log(-np.expm1(x)))


def pair_metrics(r_w, r_l, logps_w, logps_l):
    return {"rewards/chosen": r_w.mean(), "rewards/rejected": r_l.mean(),
            "rewards/accuracies": (r_w > r_l).mean(), "rewards/margins": (r_w - r_l).mean(),
            "logps/chosen": logps_w.mean(), "logps/rejected": logps_l.mean()}


def np_dpo(pc, pr, rc, rr, n_w, n_l, beta, loss_types, loss_weights=None, eps=0.0, tau=0.05):
    """dpo_trainer.py's loop over loss types, on summed log-probs pc, pr and lengths n_w, n_l."""
    chosen_logratios, rejected_logratios = pc - rc, pr - rr
    delta = chosen_logratios - rejected_logratios
    loss = 0.0
    for loss_type, weight in zip(loss_types, loss_weights or [1.0] * len(loss_types)):
        if loss_type == "sigmoid":          # TRL has no label smoothing here; ours is cDPO's
            per = -(1 - eps) * np_logsigmoid(beta * delta) - eps * np_logsigmoid(-beta * delta)
        elif loss_type == "hinge":
            per = np.maximum(1 - beta * delta, 0)
        elif loss_type == "ipo":
            per = ((chosen_logratios / n_w - rejected_logratios / n_l) - 1 / (2 * beta)) ** 2
        elif loss_type == "exo_pair":
            qw, ql = np_sigmoid(beta * delta), np_sigmoid(-beta * delta)
            per = (qw * (np_logsigmoid(beta * delta) - np.log1p(-eps))
                   + ql * (np_logsigmoid(-beta * delta) - np.log(eps)))
        elif loss_type == "nca_pair":
            cw, cl = beta * chosen_logratios, beta * rejected_logratios
            per = -np_logsigmoid(cw) - 0.5 * np_logsigmoid(-cw) - 0.5 * np_logsigmoid(-cl)
        elif loss_type == "robust":
            clean = -(1 - eps) * np_logsigmoid(beta * delta)
            flipped = -eps * np_logsigmoid(-beta * delta)
            per = (clean - flipped) / (1 - 2 * eps)
        elif loss_type == "bco_pair":
            per = -np_logsigmoid(beta * chosen_logratios) - np_logsigmoid(-beta * rejected_logratios)
        elif loss_type == "sppo_hard":
            per = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
        elif loss_type in ("aot", "aot_unpaired"):
            if loss_type == "aot":
                d = np.sort(pc - pr) - np.sort(rc - rr)
            else:
                d = np.sort(chosen_logratios) - np.sort(rejected_logratios)
            per = -np_logsigmoid(beta * d) * (1 - eps) - np_logsigmoid(-beta * d) * eps
        elif loss_type == "apo_zero":
            per = (1 - np_sigmoid(beta * chosen_logratios)) + np_sigmoid(beta * rejected_logratios)
        elif loss_type == "apo_down":
            per = np_sigmoid(beta * chosen_logratios) + (1 - np_sigmoid(beta * delta))
        elif loss_type == "discopop":
            z = delta * beta
            m = np_sigmoid(z / tau)
            per = -np_logsigmoid(z) * (1 - m) + np.exp(-z) * m
        elif loss_type == "sft":
            per = np.full_like(pc, -pc.sum() / n_w.sum())
        elif loss_type == "sigmoid_norm":
            per = -np_logsigmoid(beta * (chosen_logratios / n_w - rejected_logratios / n_l))
        loss = loss + per.mean() * weight
    r_w, r_l = beta * chosen_logratios, beta * rejected_logratios
    return loss, pair_metrics(r_w, r_l, pc, pr)


def np_kto(logps, ref, good, kl, beta, wd=1.0, wu=1.0, loss_type="kto"):
    """kto_trainer.py: z0 from the mismatched pairs, the two kinds concatenated, nanmean."""
    z0 = max(kl.mean(), 0.0) if loss_type == "kto" else 0.0
    r = logps - ref
    if loss_type == "kto":
        chosen = 1 - np_sigmoid(beta * (r[good] - z0))
        rejected = 1 - np_sigmoid(beta * (z0 - r[~good]))
    else:
        chosen = 1 - np_sigmoid(beta * r[good])
        rejected = np_sigmoid(beta * r[~good])
    loss = np.concatenate([wd * chosen, wu * rejected]).mean()
    m = {"kl": z0}
    if good.any():
        m["rewards/chosen"], m["logps/chosen"] = (beta * r[good]).mean(), logps[good].mean()
    if (~good).any():
        m["rewards/rejected"], m["logps/rejected"] = (beta * r[~good]).mean(), logps[~good].mean()
    if good.any() and (~good).any():
        m["rewards/margins"] = m["rewards/chosen"] - m["rewards/rejected"]
    return loss, m


def np_cpo(pc, pr, n_w, n_l, beta, eps=0.0, alpha=1.0, loss_type="sigmoid", gamma=0.5):
    """cpo_trainer.py: averaged log-probs for ipo and simpo, + cpo_alpha · CE over chosen tokens."""
    nll = 0.0 if alpha == 0 else -pc.sum() / n_w.sum()
    if loss_type in ("ipo", "simpo"):
        pc, pr = pc / n_w, pr / n_l
    logits = pc - pr
    if loss_type == "simpo":
        logits = logits - gamma / beta
    if loss_type in ("simpo", "sigmoid"):
        losses = -np_logsigmoid(beta * logits) * (1 - eps) - np_logsigmoid(-beta * logits) * eps
    elif loss_type == "hinge":
        losses = np.maximum(1 - beta * logits, 0)
    else:
        losses = (logits - 1 / (2 * beta)) ** 2
    m = pair_metrics(beta * pc, beta * pr, pc, pr)
    m["nll_loss"] = nll
    return losses.mean() + alpha * nll, m


def np_orpo(a_w, a_l, nll, beta):
    """orpo_trainer.py's odds_ratio_loss and loss = nll - losses.mean()."""
    log_odds = (a_w - a_l) - (np_log1mexp(a_w) - np_log1mexp(a_l))
    ratio = np_logsigmoid(log_odds)
    m = pair_metrics(beta * a_w, beta * a_l, a_w, a_l)
    m.update({"nll_loss": nll, "log_odds_ratio": ratio.mean(), "log_odds_chosen": log_odds.mean()})
    return nll - (beta * ratio).mean(), m


# ===================================================================================================
# the table: one row per loss


class Case(NamedTuple):
    name: str
    ours: Callable        # ours(*tensors, **consts) -> (loss, metrics)
    ref: Callable         # ref(*arrays, **consts) -> (loss, metrics)
    draw: Callable        # draw(rng) -> (arrays to differentiate, consts)


def pair_batch(rng, B=6, avg=False):
    """Summed log-probs of B pairs (policy and reference), their lengths, away from ties."""
    n_w, n_l = rng.integers(1, 8, B).astype(float), rng.integers(1, 8, B).astype(float)
    pc, pr = -rng.uniform(0.2, 2.0, B) * n_w, -rng.uniform(0.2, 2.0, B) * n_l
    rc, rr = pc + rng.normal(0, 1.0, B), pr + rng.normal(0, 1.0, B)
    return (pc, pr), {"rc": rc, "rr": rr, "n_w": n_w, "n_l": n_l}


def dpo_case(types, weights=None, eps=0.0, beta=0.7, tau=0.05):
    def ours(pc, pr, rc, rr, n_w, n_l):
        return dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps, loss_type=types,
                        loss_weights=weights, chosen_lengths=n_w, rejected_lengths=n_l,
                        discopop_tau=tau)

    def ref(pc, pr, rc, rr, n_w, n_l):
        return np_dpo(pc, pr, rc, rr, n_w, n_l, beta, types, weights, eps, tau)

    name = "dpo_" + "+".join(types) + (f"_eps{eps}" if eps else "")
    return Case(name, ours, ref, pair_batch)


def kto_batch(rng, B=7, kinds="both"):
    logps = -rng.uniform(1.0, 10.0, B)
    ref = logps + rng.normal(0, 1.5, B)
    good = rng.random(B) < 0.5
    good[:2] = [True, False]
    if kinds != "both":
        good[:] = kinds == "good"
    kl = rng.normal(0.3, 1.0, B)
    return (logps,), {"ref": ref, "good": good, "kl": kl}


def kto_case(loss_type="kto", kinds="both", wd=1.0, wu=1.0, beta=0.4):
    def ours(logps, ref, good, kl):
        if loss_type == "apo_zero_unpaired":
            return apo_zero_unpaired(logps, ref, good, beta=beta, desirable_weight=wd,
                                     undesirable_weight=wu)
        return kto_loss(logps, ref, good, kl, beta=beta, desirable_weight=wd, undesirable_weight=wu)

    def ref(logps, ref, good, kl):
        return np_kto(logps, ref, good, kl, beta, wd, wu, loss_type)

    return Case(f"{loss_type}_{kinds}_wd{wd}_wu{wu}", ours, ref,
                lambda rng: kto_batch(rng, kinds=kinds))


def cpo_case(loss_type, eps=0.0, alpha=1.0, beta=0.3, gamma=0.5):
    def ours(pc, pr, rc, rr, n_w, n_l):
        if loss_type == "simpo" and alpha == 0:
            return simpo_loss(pc, pr, n_w, n_l, beta=beta, gamma=gamma, label_smoothing=eps)
        return cpo_loss(pc, pr, n_w, n_l, beta=beta, label_smoothing=eps, cpo_alpha=alpha,
                        loss_type=loss_type, simpo_gamma=gamma)

    def ref(pc, pr, rc, rr, n_w, n_l):
        return np_cpo(pc, pr, n_w, n_l, beta, eps, alpha, loss_type, gamma)

    return Case(f"cpo_{loss_type}_eps{eps}_alpha{alpha}", ours, ref, pair_batch)


def orpo_batch(rng, B=6):
    # near 0 and far below it (a = -1e-12 itself, where a finite difference of the whole batch's
    # loss drowns in rounding, is checked alone in test_log1mexp_keeps_its_digits...)
    a_w = -np.concatenate([[1e-4, 80.0], rng.uniform(0.05, 3.0, B - 2)])
    a_l = -np.concatenate([[0.5, 1e-9], rng.uniform(0.05, 3.0, B - 2)])
    return (a_w, a_l, np.array(rng.uniform(0.5, 2.0))), {}


CASES = [
    *[dpo_case([t]) for t in preference.DPO_LOSS_TYPES if t != "exo_pair"],
    dpo_case(["sigmoid"], eps=0.1),
    dpo_case(["exo_pair"], eps=1e-3),
    dpo_case(["robust"], eps=0.2),
    dpo_case(["aot"], eps=0.1),
    dpo_case(["aot_unpaired"], eps=0.1),
    dpo_case(["discopop"], tau=0.5),
    dpo_case(["sigmoid", "bco_pair", "sft"], weights=[0.8, 0.2, 1.0]),       # MPO, as TRL's docs
    dpo_case(["ipo", "sigmoid_norm", "hinge"], weights=[1.0, -0.5, 2.0]),
    kto_case(), kto_case(wd=1.33, wu=0.7), kto_case(kinds="good"), kto_case(kinds="bad"),
    kto_case("apo_zero_unpaired"), kto_case("apo_zero_unpaired", wd=0.5, wu=2.0),
    cpo_case("sigmoid"), cpo_case("sigmoid", eps=0.1, alpha=0.0), cpo_case("hinge"),
    cpo_case("ipo", alpha=0.5), cpo_case("simpo", alpha=0.0, beta=2.0),
    cpo_case("simpo", eps=0.2, alpha=0.0, beta=2.0, gamma=1.0), cpo_case("simpo", alpha=1.0, beta=2.0),
    Case("orpo", lambda a_w, a_l, nll: orpo_loss(a_w, a_l, nll, beta=0.3),
         lambda a_w, a_l, nll: np_orpo(a_w, a_l, float(nll), 0.3), orpo_batch),
]


def numeric_grad(f, arrays, i, h=1e-6):
    """Central differences of the NumPy loss along input i, element by element (float64)."""
    x = arrays[i]
    g = np.zeros_like(x)
    for j in np.ndindex(x.shape):
        step = h * max(1.0, abs(x[j]))
        if abs(x[j]) < 1e-6:                    # log-probs near 0 stay <= 0 (ORPO's log1mexp)
            step = abs(x[j]) * 1e-3
        up, down = [a.copy() for a in arrays], [a.copy() for a in arrays]
        up[i][j] += step
        down[i][j] -= step
        g[j] = (f(*up) - f(*down)) / (2 * step)
    return g


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_loss_value_metrics_and_gradient_equal_numpy_from_trl(case, seed):
    arrays, consts = case.draw(np.random.default_rng(seed))
    tensors = [mr.tensor(a, requires_grad=True) for a in arrays]
    loss, metrics = case.ours(*tensors, **consts)
    expected, expected_metrics = case.ref(*arrays, **consts)

    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-12, atol=1e-14)
    assert metrics.keys() == expected_metrics.keys()
    for k, v in expected_metrics.items():
        assert isinstance(metrics[k], float), k
        np.testing.assert_allclose(metrics[k], v, rtol=1e-12, atol=1e-14, err_msg=k)

    loss.backward()
    for i, t in enumerate(tensors):
        g = numeric_grad(lambda *a: case.ref(*a, **consts)[0], arrays, i)
        got = np.zeros_like(g) if t.grad is None else t.grad     # sft never reads the rejected
        np.testing.assert_allclose(got, g, rtol=1e-5, atol=1e-7, err_msg=f"input {i}")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_loss_passes_gradcheck(case):
    arrays, consts = case.draw(np.random.default_rng(7))
    if case.name == "orpo":                      # central differences need room on both sides of 0
        arrays = (np.minimum(arrays[0], -1e-3), np.minimum(arrays[1], -1e-3), arrays[2])
    assert mr.gradcheck(lambda *ts: case.ours(*ts, **consts)[0], list(arrays))


# ===================================================================================================
# DPO: today's sigmoid, cDPO and IPO, bit for bit


def test_sigmoid_cdpo_and_ipo_are_bit_for_bit_the_lecture_formulas():
    (pc, pr), c = pair_batch(np.random.default_rng(3))
    beta, eps = 0.4, 0.15
    for loss_type, smoothing, formula in [
            ("sigmoid", 0.0, lambda h: -F.logsigmoid(beta * h).mean()),
            ("sigmoid", eps, lambda h: -((1 - eps) * F.logsigmoid(beta * h)
                                         + eps * F.logsigmoid(-beta * h)).mean()),
            ("ipo", 0.0, lambda h: ((h - 1.0 / (2.0 * beta)) ** 2).mean())]:
        grads = []
        for fn in ("dpo_loss", "formula"):
            a, b = mr.tensor(pc, requires_grad=True), mr.tensor(pr, requires_grad=True)
            if fn == "dpo_loss":
                loss, _ = dpo_loss(a, b, c["rc"], c["rr"], beta=beta, label_smoothing=smoothing,
                                   loss_type=loss_type)
            else:
                loss = formula((a - mr.tensor(c["rc"])) - (b - mr.tensor(c["rr"])))
            loss.backward()
            grads.append((loss.numpy(), a.grad, b.grad))
        for x, y in zip(*grads):
            assert np.array_equal(x, y), loss_type


def test_one_loss_type_with_weight_one_equals_the_plain_loss_and_weights_scale_it():
    (pc, pr), c = pair_batch(np.random.default_rng(4))
    args = (mr.tensor(pc), mr.tensor(pr), c["rc"], c["rr"])
    plain = dpo_loss(*args, loss_type="hinge")[0].item()
    assert dpo_loss(*args, loss_type=["hinge"], loss_weights=[1.0])[0].item() == plain
    assert dpo_loss(*args, loss_type="hinge", loss_weights=[3.0])[0].item() == pytest.approx(3 * plain)
    both = dpo_loss(*args, loss_type="hinge,sigmoid", loss_weights=[1.0, 2.0])[0].item()
    sigmoid = dpo_loss(*args)[0].item()
    assert both == pytest.approx(plain + 2 * sigmoid, rel=1e-14)


def test_bco_pair_keeps_no_state_between_calls():
    (pc, pr), c = pair_batch(np.random.default_rng(5))
    args = (mr.tensor(pc), mr.tensor(pr), c["rc"], c["rr"])
    first = dpo_loss(*args, loss_type="bco_pair")[0].item()
    dpo_loss(mr.tensor(pc + 3), mr.tensor(pr - 2), c["rc"], c["rr"], loss_type="bco_pair")
    assert dpo_loss(*args, loss_type="bco_pair")[0].item() == first


def test_aot_sends_each_gradient_back_to_its_own_pair():
    """Sorting is a gather: permuting the batch permutes the gradients the same way."""
    (pc, pr), c = pair_batch(np.random.default_rng(6))
    perm = np.random.default_rng(0).permutation(len(pc))
    grads = []
    for idx in (np.arange(len(pc)), perm):
        a, b = mr.tensor(pc[idx], requires_grad=True), mr.tensor(pr[idx], requires_grad=True)
        dpo_loss(a, b, c["rc"][idx], c["rr"][idx], loss_type="aot_unpaired")[0].backward()
        grads.append(a.grad)
    np.testing.assert_allclose(grads[0][perm], grads[1], rtol=1e-13)


# ===================================================================================================
# bad input: one line each


@pytest.fixture
def pair():
    x = mr.tensor(np.array([-1.0, -2.0]))
    z = np.array([-1.5, -1.5])
    return x, z


def test_unknown_loss_type_is_one_line_listing_the_known_ones(pair):
    x, z = pair
    with pytest.raises(ValueError) as info:
        dpo_loss(x, x, z, z, loss_type="sigmoid,hingee")
    message = str(info.value)
    assert "\n" not in message and "hingee" in message
    assert all(name in message for name in preference.DPO_LOSS_TYPES)


def test_loss_weights_of_the_wrong_length_is_one_line(pair):
    x, z = pair
    with pytest.raises(ValueError, match="2 loss_weights for 3 loss types") as info:
        dpo_loss(x, x, z, z, loss_type=["sigmoid", "hinge", "sft"], loss_weights=[1.0, 1.0],
                 chosen_lengths=[1, 2])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs, match", [
    ({"loss_type": "exo_pair"}, "label_smoothing > 0"),
    ({"loss_type": "robust", "label_smoothing": 0.5}, "< 0.5"),
    ({"loss_type": "hinge", "label_smoothing": 0.1}, "label_smoothing applies to"),
    ({"loss_type": "sft"}, "needs chosen_lengths"),
    ({"loss_type": "sigmoid_norm", "chosen_lengths": [1, 1]}, "needs rejected_lengths"),
    ({"loss_type": "sigmoid_norm", "chosen_lengths": [1, 0], "rejected_lengths": [1, 1]}, ">= 1"),
])
def test_dpo_loss_type_requirements_are_one_line(pair, kwargs, match):
    x, z = pair
    with pytest.raises(ValueError, match=match):
        dpo_loss(x, x, z, z, **kwargs)


def test_kto_refusals():
    x = mr.tensor(np.array([-1.0, -2.0]))
    with pytest.raises(ValueError, match="booleans"):
        kto_loss(x, np.zeros(2), np.array([0.5, 1.0]), np.zeros(2))
    with pytest.raises(ValueError, match="needs kl"):
        kto_loss(x, np.zeros(2), np.array([True, False]), None)
    with pytest.raises(ValueError, match="one shape"):
        kto_loss(x, np.zeros(3), np.array([True, False]), np.zeros(2))
    with pytest.raises(TypeError, match="Tensors"):
        kto_loss(np.zeros(2), np.zeros(2), np.array([True, False]), np.zeros(2))


def test_cpo_and_orpo_refusals():
    x = mr.tensor(np.array([-1.0, -2.0]))
    with pytest.raises(ValueError, match="unknown loss_type 'kto_pair'; known: sigmoid, hinge"):
        cpo_loss(x, x, [1, 1], [1, 1], loss_type="kto_pair")
    with pytest.raises(ValueError, match=">= 1"):
        simpo_loss(x, x, [1, 0], [1, 1])
    with pytest.raises(ValueError, match="<= 0"):
        orpo_loss(mr.tensor(np.array([0.1, -1.0])), x, 1.0)


# ===================================================================================================
# KTO's mismatched pairs; its reference point is a constant


def test_mismatched_pairs_rotate_each_batch_by_one_as_trl():
    assert kto_mismatched_pairs(4).tolist() == [3, 0, 1, 2]
    assert kto_mismatched_pairs(5, batch_size=2).tolist() == [1, 0, 3, 2, 4]
    index = kto_mismatched_pairs(12, batch_size=4)
    assert (index != np.arange(12)).all()                 # every prompt gets another's completion
    assert sorted(index.tolist()) == list(range(12))      # and the batch's own completions


def test_kto_reference_point_is_clamped_at_zero_and_carries_no_gradient():
    logps = mr.tensor(np.array([-2.0, -3.0, -1.0]), requires_grad=True)
    ref, good = np.array([-2.5, -2.0, -1.5]), np.array([True, False, True])
    kl = mr.tensor(np.array([-1.0, -2.0, 0.5]), requires_grad=True)
    loss, metrics = kto_loss(logps, ref, good, kl, beta=0.5)
    assert metrics["kl"] == 0.0
    assert loss.item() == pytest.approx(apo_zero_unpaired(logps, ref, good, beta=0.5)[0].item())
    loss.backward()
    assert kl.grad is None


# ===================================================================================================
# ORPO at the edges of log(1 - e^a)


def test_orpo_with_a_certain_chosen_completion_is_finite_with_the_limit_gradient():
    a_w = mr.tensor(np.array([0.0, -0.4]), requires_grad=True)
    a_l = mr.tensor(np.array([-0.7, -1.1]), requires_grad=True)
    loss, metrics = orpo_loss(a_w, a_l, 0.0, beta=1.0)
    loss.backward()
    assert np.isfinite(loss.item()) and np.isfinite(a_w.grad).all() and np.isfinite(a_l.grad).all()
    # at a_w = 0 the pair's term is log σ(+inf) = 0, its a_w-gradient -β/B · e^a_l / (1 - e^a_l)
    np.testing.assert_allclose(a_w.grad[0], -0.5 * np.exp(-0.7) / -np.expm1(-0.7), rtol=1e-14)
    assert a_l.grad[0] == 0.0
    assert metrics["log_odds_chosen"] == np.inf
    # and the limit is the one the gradient approaches from below
    near = mr.tensor(np.array([-1e-9, -0.4]), requires_grad=True)
    orpo_loss(near, mr.tensor(np.array([-0.7, -1.1])), 0.0, beta=1.0)[0].backward()
    np.testing.assert_allclose(near.grad, a_w.grad, rtol=1e-6)


def test_orpo_with_a_certain_rejected_completion_is_an_infinite_loss_as_in_trl():
    loss, _ = orpo_loss(mr.tensor(np.array([-0.5])), mr.tensor(np.array([0.0])), 0.0)
    assert loss.item() == np.inf


@pytest.mark.parametrize("a", [-1e-12, -1e-6, -0.6931471805599453, -0.7, -5.0, -80.0])
def test_log1mexp_keeps_its_digits_and_passes_gradcheck(a):
    x = np.array([a])
    exact = np.log(-np.expm1(x)) if a > -1 else np.log1p(-np.exp(x))
    np.testing.assert_allclose(F.log1mexp(mr.tensor(x)).numpy(), exact, rtol=1e-15)
    eps = min(1e-6, abs(a) * 1e-3)
    assert mr.gradcheck(F.log1mexp, [x], eps=eps, rtol=1e-6)
    a_l = np.array([-0.3])
    np.testing.assert_allclose(F.logsigmoid_odds_ratio(mr.tensor(x), mr.tensor(a_l)).numpy(),
                               -np_orpo(x, a_l, 0.0, 1.0)[0], rtol=1e-12)
    other = mr.tensor(a_l)                             # a constant: eps fits only the input near 0
    assert mr.gradcheck(lambda w: F.logsigmoid_odds_ratio(w, other), [x], eps=eps, rtol=1e-5)
    assert mr.gradcheck(lambda l: F.logsigmoid_odds_ratio(other, l), [x], eps=eps, rtol=1e-5)


@pytest.mark.parametrize("first", ["minirlhf.preference", "minirlhf.losses"])
def test_the_losses_import_from_losses_whichever_module_comes_first(first):
    code = (f"import {first}; from minirlhf.losses import kto_loss, simpo_loss, orpo_loss, cpo_loss; "
            "from minirlhf.preference import kto_loss as k; assert k is kto_loss")
    subprocess.run([sys.executable, "-c", code], check=True)
