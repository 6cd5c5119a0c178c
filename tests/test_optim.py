"""Optimisers against hand-written NumPy references, clipping, the schedule, and resuming."""

import math

import numpy as np
import pytest

import minirlhf as mr
from minirlhf import kernels
from minirlhf.backend import to_device, to_numpy
from minirlhf.model import GPT, GPTConfig
from minirlhf.nn import Embedding, LayerNorm, Linear, Module, Parameter
from minirlhf.optim import SGD, AdamW, clip_grad_norm_, lr_schedule, param_groups


def grads_for(step, shapes, seed=0):
    """Fixed, different gradients for each step."""
    rng = np.random.default_rng(seed + step)
    return [rng.standard_normal(s) for s in shapes]


def test_adamw_matches_a_hand_computed_reference_for_three_steps():
    rng = np.random.default_rng(0)
    w0, b0 = rng.standard_normal((3, 2)), rng.standard_normal(2)
    w, b = Parameter(w0.copy()), Parameter(b0.copy())
    lr, (beta1, beta2), eps, wd = 0.1, (0.9, 0.95), 1e-8, 0.1
    optimizer = AdamW([{"params": [w], "weight_decay": wd}, {"params": [b], "weight_decay": 0.0}],
                lr=lr, betas=(beta1, beta2), eps=eps)

    ref = {"w": [w0.copy(), np.zeros_like(w0), np.zeros_like(w0), wd],
           "b": [b0.copy(), np.zeros_like(b0), np.zeros_like(b0), 0.0]}
    for t in range(1, 4):
        gw, gb = grads_for(t, [(3, 2), (2,)])
        w.grad, b.grad = gw.copy(), gb.copy()
        optimizer.step()
        for key, g in (("w", gw), ("b", gb)):
            p, m, v, decay = ref[key]
            m = beta1 * m + (1 - beta1) * g
            v = beta2 * v + (1 - beta2) * g * g
            p = p - lr * decay * p                                   # decoupled weight decay
            m_hat, v_hat = m / (1 - beta1 ** t), v / (1 - beta2 ** t)  # bias correction
            p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
            ref[key] = [p, m, v, decay]
        np.testing.assert_allclose(w.data, ref["w"][0], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(b.data, ref["b"][0], rtol=1e-12, atol=1e-14)
    assert optimizer.state[w]["step"] == 3


def test_adamw_updates_in_place_and_float32_stays_float32():
    w = Parameter(np.ones((4, 4), dtype=np.float32))
    optimizer = AdamW([w], lr=1e-2)
    arrays = []
    for t in range(3):
        w.grad = grads_for(t, [(4, 4)])[0].astype(np.float32)
        optimizer.step()
        arrays.append(w.data)
    assert arrays[0] is arrays[1] is arrays[2] and w.dtype == np.float32   # after the first step
    assert optimizer.state[w]["m"].dtype == np.float32 and optimizer.state[w]["v"].dtype == np.float32


SHAPES = [(3, 4), (4,), (4, 2), (2,), (5, 3), (3,), (1,), (2, 2, 2)]


def _params(device, dtype=np.float32, shapes=SHAPES, seed=3):
    rng = np.random.default_rng(seed)
    return [Parameter(to_device(rng.standard_normal(s).astype(dtype), device)) for s in shapes]


def _set_grads(params, t, skip=()):
    for i, (p, g) in enumerate(zip(params, grads_for(t, [p.shape for p in params]))):
        p.grad = None if i in skip else to_device(g.astype(p.dtype), p.device)


MAKERS = {"AdamW": lambda ps, wd: AdamW(ps, lr=0.1, weight_decay=wd),
          "SGD": lambda ps, wd: SGD(ps, lr=0.1, momentum=0.9, weight_decay=wd)}


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_a_group_updated_as_one_vector_equals_each_parameter_updated_alone(device, name):
    """The group path (parameters laid end to end) against one optimizer per parameter, to the bit;
    in step 3 two parameters have no gradient: they and their state stay as they were."""
    make = MAKERS[name]
    together, alone = _params(device), _params(device)
    optimizer = make([{"params": together[:5], "weight_decay": 0.1},
                {"params": together[5:], "weight_decay": 0.0}], 0)
    singles = [make([p], 0.1 if i < 5 else 0.0) for i, p in enumerate(alone)]
    for t in range(1, 6):
        skip = (1, 6) if t == 3 else ()
        for params in (together, alone):
            _set_grads(params, t, skip)
        before = [to_numpy(p.data).copy() for p in together]
        optimizer.step()
        for single, p in zip(singles, alone):
            if p.grad is not None:
                single.step()
        for i, (a, b) in enumerate(zip(together, alone)):
            np.testing.assert_array_equal(to_numpy(a.data), to_numpy(b.data))
            if i in skip:
                np.testing.assert_array_equal(to_numpy(a.data), before[i])
            for k, v in singles[i].state[b].items():
                np.testing.assert_array_equal(to_numpy(optimizer.state[a][k]), to_numpy(v))


def test_each_parameters_state_is_its_slice_of_the_groups_vector():
    params = _params("cpu")
    optimizer = AdamW(params, lr=0.1)
    _set_grads(params, 1)
    optimizer.step()
    m = optimizer.state[params[2]]["m"]
    assert m.shape == params[2].shape and np.shares_memory(m, optimizer.state[params[0]]["m"].base)
    m_before = m.copy()
    _set_grads(params, 2)
    optimizer.step()                                  # the update writes through to the slice
    m_after = optimizer.state[params[2]]["m"]
    assert not np.array_equal(m_after, m_before) and m_after is m


def test_the_parameters_become_views_of_one_vector_that_the_update_writes_into():
    params = _params("cpu")
    optimizer = AdamW(params, lr=0.1)
    _set_grads(params, 1)
    optimizer.step()
    vector = params[0].data.base
    assert all(p.data.base is vector for p in params)
    assert vector.size == sum(p.size for p in params)
    arrays = [p.data for p in params]
    _set_grads(params, 2)
    optimizer.step()                                  # no copies: the same arrays, new values
    assert all(p.data is a for p, a in zip(params, arrays))


def _step_with_one_adamw_per_parameter(together, alone, steps, before_step=lambda t: None):
    """Step AdamW on ``together`` and one AdamW per parameter on ``alone`` (same parameters and
    gradients); both sides must give the same numbers."""
    optimizer, singles = AdamW(together, lr=0.1), [AdamW([p], lr=0.1) for p in alone]
    for t in range(1, steps + 1):
        before_step(t)
        for params in (together, alone):
            _set_grads(params, t)
        optimizer.step()
        for single in singles:
            single.step()
        for a, b in zip(together, alone):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(to_numpy(a.data), to_numpy(b.data))


def test_a_parameter_array_replaced_between_steps_is_taken_up(device):
    """``p.data = ...`` after a step (as ``model.to`` or an assignment does): the next step updates
    the new values, as an optimizer per parameter does, and the new array joins the vector."""
    together, alone = _params(device), _params(device)
    arrays = {}

    def replace_at_step_2(t):
        if t == 2:
            for params in (together, alone):
                params[3].data = params[3].data * 2
        if t == 3:                              # laid out again at step 2, then left as it is
            arrays.update(enumerate(p.data for p in together))

    _step_with_one_adamw_per_parameter(together, alone, 4, replace_at_step_2)
    assert all(p.data is arrays[i] for i, p in enumerate(together))


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_an_empty_group_is_allowed(name):
    """A model without biases or norms gives `param_groups` an empty no-decay group."""
    layer = Linear(3, 2, bias=False, rng=np.random.default_rng(0))
    groups = param_groups(layer, weight_decay=0.1)
    assert [len(g["params"]) for g in groups] == [1, 0]
    optimizer = MAKERS[name](groups, 0.1)
    before = layer.weight.data.copy()
    layer(mr.tensor(np.ones((4, 3), dtype=np.float32))).sum().backward()
    optimizer.step()
    assert not np.array_equal(layer.weight.data, before)


def test_a_group_of_mixed_dtypes_is_updated_parameter_by_parameter():
    mixed = _params("cpu")[:2] + _params("cpu", dtype=np.float64)[2:4]
    alone = _params("cpu")[:2] + _params("cpu", dtype=np.float64)[2:4]
    _step_with_one_adamw_per_parameter(mixed, alone, 2)


def test_the_group_vector_split_across_threads_equals_it_whole(monkeypatch):
    whole, split = _params("cpu", shapes=[(40, 30), (30,), (30, 50)]), \
        _params("cpu", shapes=[(40, 30), (30,), (30, 50)])
    opt_whole, opt_split = AdamW(whole, lr=0.1), AdamW(split, lr=0.1)
    before = kernels.get_num_threads()
    try:
        for t in range(1, 4):
            _set_grads(whole, t)
            _set_grads(split, t)
            opt_whole.step()
            with monkeypatch.context() as m:   # blocks of 64 numbers on 3 threads
                m.setattr(kernels, "BLOCK_NUMBERS", 64)
                m.setattr(kernels, "MIN_PARALLEL_NUMBERS", 1)
                kernels.set_num_threads(3)
                opt_split.step()
                kernels.set_num_threads(before)
            for a, b in zip(whole, split):
                np.testing.assert_array_equal(a.data, b.data)
    finally:
        kernels.set_num_threads(before)


# ===================================================================================================
# the state follows its parameter (as PyTorch keys it), whatever happens to the groups' lists

PATHS = ["one vector", "per parameter"]   # a parameter without a gradient sends its group per parameter


@pytest.mark.parametrize("path", PATHS)
def test_removing_a_parameter_leaves_the_others_state_as_it_was(path):
    """The issue's reproduction: b was handed a's moments when a left the group."""
    a, b = Parameter(np.zeros(2)), Parameter(np.zeros(2))
    frozen = [Parameter(np.ones(2))] if path == "per parameter" else []
    optimizer = AdamW([a, b] + frozen, lr=0.1, weight_decay=0.0)
    a.grad, b.grad = np.full(2, 100.0), np.full(2, 1.0)
    optimizer.step()
    optimizer.param_groups[0]["params"].remove(a)
    b.grad = np.full(2, 1.0)
    optimizer.step()
    np.testing.assert_allclose(b.data, [-0.19999999799999935] * 2, rtol=1e-13)  # torch.optim.AdamW
    assert frozen == [] or frozen[0].data.tolist() == [1.0, 1.0]


# torch.optim (2.13, float64, AdamW with betas=(0.9, 0.95)) after `edit_the_groups_between_steps`
TORCH_AFTER_EDITS = {
    "AdamW": [[0.7331225864273245, 2.2103120363117874], [-1.3482291011969256, 0.8466582348818785],
              [0.09546311896635197, -0.49127141385161377], [1.9400000000384616, -2.0399999995]],
    "SGD": [[-2.0167210000000004, 9.166958000000001], [-3.6383701100000003, 3.237000055],
            [-1.9316700000000002, 0.09823000000000011], [1.34, -2.04]],
}
EDIT_MAKERS = {"AdamW": lambda ps: AdamW(ps, lr=0.1, weight_decay=0.1),
               "SGD": lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1)}


def edit_the_groups_between_steps(name, path, stop_after=4):
    """Step 1 on [a, b]; a removed; step 2; c new in front, a back at the end; step 3; a group of
    d added with its own lr; step 4. Returns the parameters a, b, c, d and the optimizer."""
    a, b, c, d = (Parameter(np.array(v)) for v in ([1.0, 2.0], [-1.0, 0.5], [0.3, -0.7], [2.0, -2.0]))
    frozen = [Parameter(np.full(2, 9.0))] if path == "per parameter" else []
    optimizer = EDIT_MAKERS[name]([a, b] + frozen)
    edits = {2: lambda: optimizer.param_groups[0]["params"].remove(a),
             3: lambda: (optimizer.param_groups[0]["params"].insert(0, c),
                         optimizer.param_groups[0]["params"].append(a)),
             4: lambda: optimizer.add_param_group({"params": [d], "lr": 0.05})}
    for t in range(1, stop_after + 1):
        edits.get(t, lambda: None)()
        for i, p in enumerate((a, b, c, d)):
            p.grad = np.array([1.0 + t * i, -2.0 * t + i * i]) * (10.0 if (t, i) == (1, 0) else 1.0)
        optimizer.step()
    return (a, b, c, d), optimizer


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", sorted(EDIT_MAKERS))
def test_removing_appending_reordering_and_adding_a_group_give_torchs_numbers(name, path):
    params, _ = edit_the_groups_between_steps(name, path)
    for p, expected in zip(params, TORCH_AFTER_EDITS[name]):
        np.testing.assert_allclose(p.data, expected, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("name", sorted(EDIT_MAKERS))
def test_the_state_after_edits_round_trips_through_state_dict(name):
    (a, b, c, d), optimizer = edit_the_groups_between_steps(name, "one vector", stop_after=3)
    twins = {p: Parameter(p.data.copy()) for p in (a, b, c, d)}
    again = EDIT_MAKERS[name]([twins[p] for p in optimizer.param_groups[0]["params"]])
    again.load_state_dict(optimizer.state_dict())
    assert set(optimizer.state_dict()["state"]) == {0, 1, 2}      # c, b and a, in the group's order
    optimizer.add_param_group({"params": [d], "lr": 0.05})
    again.add_param_group({"params": [twins[d]], "lr": 0.05})
    for p in (a, b, c, d):
        p.grad = twins[p].grad = np.array([0.5, -1.5])
    optimizer.step()
    again.step()
    for p in (a, b, c, d):
        np.testing.assert_array_equal(p.data, twins[p].data)


def test_a_parameter_moved_to_another_group_keeps_its_state():
    a, b = Parameter(np.zeros(2)), Parameter(np.zeros(2))
    twin_a, twin_b = Parameter(np.zeros(2)), Parameter(np.zeros(2))
    optimizer = AdamW([{"params": [a, b]}, {"params": [], "lr": 0.1}], lr=0.1)
    alone = [AdamW([twin_a], lr=0.1), AdamW([twin_b], lr=0.1)]
    for t in range(1, 4):
        if t == 2:
            optimizer.param_groups[0]["params"].remove(b)
            optimizer.param_groups[1]["params"].append(b)
        for p, twin, g in ((a, twin_a, 3.0 * t), (b, twin_b, -1.0 / t)):
            p.grad, twin.grad = np.full(2, g), np.full(2, g)
        optimizer.step()
        for single in alone:
            single.step()
    np.testing.assert_array_equal(a.data, twin_a.data)
    np.testing.assert_array_equal(b.data, twin_b.data)
    assert optimizer.state[b]["step"] == 3


def test_a_parameter_in_two_groups_is_refused_by_add_param_group():
    p = Parameter(np.zeros(1))
    optimizer = SGD([p], lr=0.1)
    with pytest.raises(ValueError, match="more than one"):
        optimizer.add_param_group({"params": [p]})


# ===================================================================================================
# 0-d parameters: updated in place on both paths, also after ``p.data`` was given a NumPy scalar

ZERO_D_SHAPES = [(), (3,), (), (1,), (2, 2)]


@pytest.mark.parametrize("name", sorted(MAKERS))
@pytest.mark.parametrize("path", PATHS)
def test_0d_parameters_are_updated_as_by_one_optimizer_each(name, path):
    make = MAKERS[name]
    together, alone = _params("cpu", np.float64, ZERO_D_SHAPES), _params("cpu", np.float64, ZERO_D_SHAPES)
    optimizer, singles = make(together, 0.1), [make([p], 0.1) for p in alone]
    skip = (3,) if path == "per parameter" else ()
    for t in range(1, 5):
        if t == 3:                                   # np.float64 * 0.5 is a NumPy scalar
            for params in (together, alone):
                params[0].data = params[0].data * 0.5
        for params in (together, alone):
            _set_grads(params, t, skip)
        clip_grad_norm_(together, 1.0)
        clip_grad_norm_(alone, 1.0)
        optimizer.step()
        for single, p in zip(singles, alone):
            if p.grad is not None:
                single.step()
        for a, b in zip(together, alone):
            assert type(a.data) is np.ndarray and a.shape == b.shape
            np.testing.assert_array_equal(a.data, b.data)
    assert together[0].data != _params("cpu", np.float64, ZERO_D_SHAPES)[0].data * 0.5


def test_clip_grad_norm_scales_0d_gradients_in_place():
    a, b = Parameter(np.array(3.0)), Parameter(np.zeros(1))
    a.grad, b.grad = np.float64(3.0), np.array([4.0])          # a NumPy scalar is stored as 0-d
    assert clip_grad_norm_([a, b], 1.0) == pytest.approx(5.0)
    np.testing.assert_allclose([a.grad, b.grad[0]], [0.6, 0.8], rtol=1e-5)


class Net(Module):
    def __init__(self):
        super().__init__()
        self.emb = Embedding(5, 3)
        self.fc = Linear(3, 4)
        self.ln = LayerNorm(4)


def test_param_groups_decay_only_matrices_that_are_not_embeddings():
    net = Net()
    decay, no_decay = param_groups(net, weight_decay=0.1)
    assert decay["params"] == [net.fc.weight] and decay["weight_decay"] == 0.1
    assert no_decay["params"] == [net.emb.weight, net.fc.bias, net.ln.weight, net.ln.bias]
    assert no_decay["weight_decay"] == 0.0

    # with zero gradients only the decay moves the weights: p <- p (1 - lr wd) or not at all
    before = net.state_dict()
    optimizer = AdamW(param_groups(net, 0.1), lr=0.5)
    for p in net.parameters():
        p.grad = np.zeros_like(p.data)
    optimizer.step()
    np.testing.assert_allclose(net.fc.weight.data, before["fc.weight"] * (1 - 0.5 * 0.1), rtol=1e-6)
    for name in ("emb.weight", "fc.bias", "ln.weight", "ln.bias"):
        np.testing.assert_array_equal(net.state_dict()[name], before[name])


def test_gpt_groups_leave_the_tied_embedding_and_positions_undecayed():
    model = GPT(GPTConfig(n_layer=2, n_embd=16, n_head=2, block_size=8, vocab_size=11))
    decay, no_decay = param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in decay["params"])
    assert all(n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) for n in decayed)
    assert len(decayed) == 2 * 4
    assert model.transformer.wte.weight in no_decay["params"]
    assert len(decay["params"]) + len(no_decay["params"]) == len(model.parameters())


def test_sgd_with_momentum_and_weight_decay_matches_the_reference():
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal(5)
    p = Parameter(p0.copy())
    optimizer = SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01)
    ref, buf = p0.copy(), None
    for t in range(4):
        g = grads_for(t, [(5,)])[0]
        p.grad = g.copy()
        optimizer.step()
        d = g + 0.01 * ref
        buf = d if buf is None else 0.9 * buf + d
        ref = ref - 0.1 * buf
        np.testing.assert_allclose(p.data, ref, rtol=1e-12)


def test_plain_sgd_is_p_minus_lr_g():
    p = Parameter(np.array([1.0, 2.0]))
    p.grad = np.array([0.5, -1.0])
    SGD([p], lr=0.1).step()
    np.testing.assert_allclose(p.data, [0.95, 2.1])


def test_clip_grad_norm_scales_to_max_norm_and_returns_the_norm_before():
    a, b = Parameter(np.zeros(2)), Parameter(np.zeros(1))
    a.grad, b.grad = np.array([3.0, 0.0]), np.array([4.0])          # global norm 5
    assert clip_grad_norm_([a, b], max_norm=1.0) == pytest.approx(5.0)
    norm = math.sqrt((a.grad ** 2).sum() + (b.grad ** 2).sum())
    assert norm == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(a.grad / b.grad[0], [0.75, 0.0])      # direction kept
    assert clip_grad_norm_([a, b], max_norm=10.0) == pytest.approx(1.0, rel=1e-5)
    assert norm == pytest.approx(math.sqrt((a.grad ** 2).sum() + (b.grad ** 2).sum()))  # unchanged
    assert clip_grad_norm_([Parameter(np.zeros(2))], 1.0) == 0.0       # no gradients at all


def test_lr_schedule_warms_up_linearly_then_decays_by_cosine_to_min():
    base, lo, warm, total = 1e-3, 1e-4, 10, 110
    lrs = [lr_schedule(s, base, warm, total, lo) for s in range(total + 5)]
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(base / 2)
    assert lrs[warm] == pytest.approx(base)
    assert lrs[60] == pytest.approx((base + lo) / 2)
    assert lrs[total] == lo and lrs[-1] == lo
    assert all(x >= y for x, y in zip(lrs[warm:], lrs[warm + 1:]))   # never increases after warm-up
    assert lr_schedule(0, base, 0, total, lo) == base                # no warm-up


def test_setting_lr_sets_every_group():
    a, b = Parameter(np.zeros(2)), Parameter(np.zeros((2, 2)))
    optimizer = AdamW([{"params": [a]}, {"params": [b], "lr": 5.0}], lr=1.0)
    assert [g["lr"] for g in optimizer.param_groups] == [1.0, 5.0]
    optimizer.lr = 0.25
    assert optimizer.lr == 0.25 and [g["lr"] for g in optimizer.param_groups] == [0.25, 0.25]


@pytest.mark.parametrize("make", [lambda ps: AdamW(ps, lr=0.1, weight_decay=0.1),
                                  lambda ps: SGD(ps, lr=0.1, momentum=0.9)])
def test_state_round_trip_gives_identical_next_steps(make):
    rng = np.random.default_rng(2)
    p1 = [Parameter(rng.standard_normal((3, 3)).astype(np.float32)), Parameter(np.ones(3, np.float32))]
    opt1 = make(p1)
    for t in range(2):
        for p, g in zip(p1, grads_for(t, [(3, 3), (3,)])):
            p.grad = g.astype(np.float32)
        opt1.step()

    p2 = [Parameter(p.data.copy()) for p in p1]
    opt2 = make(p2)
    state = opt1.state_dict()
    opt2.load_state_dict({"state": {str(k): v for k, v in state["state"].items()},   # as after JSON
                          "param_groups": state["param_groups"]})
    for t in range(2, 4):
        for ps in (p1, p2):
            for p, g in zip(ps, grads_for(t, [(3, 3), (3,)])):
                p.grad = g.astype(np.float32)
        opt1.step()
        opt2.step()
        for a, b in zip(p1, p2):
            np.testing.assert_array_equal(a.data, b.data)


def test_state_dict_holds_numpy_copies():
    p = Parameter(np.ones(2, np.float32))
    optimizer = AdamW([p], lr=0.1)
    p.grad = np.ones(2, np.float32)
    optimizer.step()
    sd = optimizer.state_dict()
    assert sd["state"][0]["step"] == 1 and isinstance(sd["state"][0]["m"], np.ndarray)
    sd["state"][0]["m"][:] = 99
    assert optimizer.state[p]["m"][0] != 99
    assert sd["param_groups"][0]["betas"] == [0.9, 0.95] and sd["param_groups"][0]["params"] == [0]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        AdamW([], lr=0.1)
    with pytest.raises(TypeError):
        AdamW(Net(), lr=0.1)
    with pytest.raises(ValueError):
        AdamW([Parameter(np.zeros(1))], lr=0.1, betas=(0.9, 1.0))
    p = Parameter(np.zeros(1))
    with pytest.raises(ValueError, match="more than one"):
        SGD([{"params": [p]}, {"params": [p]}], lr=0.1)
