"""minirlhf against PyTorch on random graphs and random optimizer runs, and the same runs checked
without PyTorch.

A random graph is a short program over the public ops (elementwise, reductions, movement, indexing,
matmul, the fused functions) on float64 leaves of 0-d, size-1 and broadcast shapes, reusing leaves
and intermediate results. Each is run through several ``backward()`` calls without zeroing, with
in-place edits of ``.grad`` between calls (scaled, shifted, zeroed, set to None). A random optimizer
run steps AdamW or SGD while parameters are removed, appended, moved between groups, reordered,
frozen (no gradient), given a new ``p.data``, and groups added, with clipping, a schedule and
``state_dict`` round trips on the way.

With PyTorch installed, both are compared with ``torch.autograd`` and ``torch.optim``. Without it
(CI), a fixed set of the same graphs is checked against float64 central differences
(`mr.gradcheck`) and the accumulation identity (after calls with edits, ``.grad`` is the edits
applied to the sum of one call's gradients), and the same optimizer runs against a plain NumPy
AdamW/SGD written below, whose state is a dict keyed by ``id(param)``.

    MINIRLHF_FUZZ_SECONDS=300 OMP_NUM_THREADS=1 python -m pytest -s tests/test_against_torch.py

runs each torch comparison on new seeds for that many seconds and prints how many ran clean; the
seed of a failing case is in its message.
"""

import itertools
import math
import os
import time
from typing import NamedTuple

import numpy as np
import pytest

import minirlhf as mr
import minirlhf.functional as F
from minirlhf.nn import Parameter
from minirlhf.optim import SGD, AdamW, clip_grad_norm_, lr_schedule

SHAPES = [(), (1,), (3,), (1, 1), (2, 3), (1, 3), (2, 1), (3, 1), (2, 1, 3), (1, 2, 3)]
CI_CASES = 60          # graphs and optimizer runs checked without torch
TORCH_CASES = 150      # compared with torch when no time budget is given


def fuzz_seeds():
    """Seeds 0, 1, ...: TORCH_CASES of them, or as many as MINIRLHF_FUZZ_SECONDS allows."""
    seconds = float(os.environ.get("MINIRLHF_FUZZ_SECONDS", "0"))
    if seconds <= 0:
        yield from range(TORCH_CASES)
        return
    end = time.monotonic() + seconds
    for seed in itertools.count():
        if time.monotonic() > end:
            return
        yield seed


def on_seed(check, seed, *args):
    """Run ``check(seed, ...)``, naming the seed in any failure."""
    try:
        check(seed, *args)
    except AssertionError as e:
        raise AssertionError(f"{check.__name__}, seed {seed}: {e}") from None


# ===================================================================================================
# random graphs: a program of ops over leaves and earlier results


def broadcasts(a, b):
    try:
        np.broadcast_shapes(a, b)
        return True
    except ValueError:
        return False


# each op: (how to run it on minirlhf tensors, on torch tensors); ``T`` is the torch module
def _reduce_torch(name):
    def run(T, x, axis, keepdims):
        fn = {"sum": T.sum, "mean": T.mean, "max": T.amax}[name]
        return fn(x, dim=tuple(range(x.ndim)) if axis is None else axis, keepdim=keepdims)
    return run


OPS = {
    "add": (lambda a, b: a + b, lambda T, a, b: a + b),
    "sub": (lambda a, b: a - b, lambda T, a, b: a - b),
    "mul": (lambda a, b: a * b, lambda T, a, b: a * b),
    "div": (lambda a, b: a / (b * b + 0.5), lambda T, a, b: a / (b * b + 0.5)),
    "pow_tensor": (lambda a, b: (a * a + 0.5) ** b.tanh(), lambda T, a, b: (a * a + 0.5) ** b.tanh()),
    "pow_int": (lambda a, k: a ** k, lambda T, a, k: a ** k),
    "rsub_rdiv": (lambda a: (1.0 - a) / 3.0 + 2.0 / (a * a + 1.0),
                  lambda T, a: (1.0 - a) / 3.0 + 2.0 / (a * a + 1.0)),
    "neg": (lambda a: -a, lambda T, a: -a),
    "exp": (lambda a: a.exp(), lambda T, a: a.exp()),
    "log": (lambda a: (a * a + 0.5).log(), lambda T, a: (a * a + 0.5).log()),
    "sqrt": (lambda a: (a * a + 0.5).sqrt(), lambda T, a: (a * a + 0.5).sqrt()),
    "tanh": (lambda a: a.tanh(), lambda T, a: a.tanh()),
    "sigmoid": (lambda a: a.sigmoid(), lambda T, a: a.sigmoid()),
    "relu": (lambda a: a.relu(), lambda T, a: a.relu()),
    "clip": (lambda a, lo, hi: a.clip(lo, hi), lambda T, a, lo, hi: a.clamp(lo, hi)),
    "gelu": (F.gelu, lambda T, a: T.nn.functional.gelu(a, approximate="tanh")),
    "logsigmoid": (F.logsigmoid, lambda T, a: T.nn.functional.logsigmoid(a)),
    "sum": (lambda a, axis, keepdims: a.sum(axis, keepdims), _reduce_torch("sum")),
    "mean": (lambda a, axis, keepdims: a.mean(axis, keepdims), _reduce_torch("mean")),
    "max": (lambda a, axis, keepdims: a.max(axis, keepdims), _reduce_torch("max")),
    "reshape": (lambda a, shape: a.reshape(shape), lambda T, a, shape: a.reshape(shape)),
    "transpose": (lambda a, d0, d1: a.transpose(d0, d1), lambda T, a, d0, d1: a.transpose(d0, d1)),
    "permute": (lambda a, dims: a.permute(*dims), lambda T, a, dims: a.permute(*dims)),
    "getitem": (lambda a, index: a[index], lambda T, a, index: a[index]),
    "gather": (lambda a, ids: a[ids], lambda T, a, ids: a[T.as_tensor(ids)]),
    "matmul": (lambda a, b: a @ b, lambda T, a, b: a @ b),
    "softmax": (lambda a: F.softmax(a, -1), lambda T, a: T.softmax(a, -1)),
    "log_softmax": (lambda a: F.log_softmax(a, -1), lambda T, a: T.log_softmax(a, -1)),
    "where": (lambda a, b, cond: mr.where(cond, a, b),
              lambda T, a, b, cond: T.where(T.as_tensor(cond), a, b)),
    "masked_fill": (lambda a, mask, value: a.masked_fill(mask, value),
                    lambda T, a, mask, value: a.masked_fill(T.as_tensor(mask), value)),
    "concatenate": (lambda a, b: mr.concatenate([a, b], 0), lambda T, a, b: T.cat([a, b], 0)),
    "stack": (lambda a, b: mr.stack([a, b], 0), lambda T, a, b: T.stack([a, b], 0)),
    "layer_norm": (F.layer_norm,
                   lambda T, x, w, b: T.nn.functional.layer_norm(x, w.shape, w, b, eps=1e-5)),
    "embedding": (lambda w, ids: F.embedding(ids, w),
                  lambda T, w, ids: T.nn.functional.embedding(T.as_tensor(ids), w)),
}
KINKS = {"relu", "clip", "max"}


class Graph(NamedTuple):
    leaves: list        # float64 arrays
    needs_grad: list    # which leaves require grad (the rest are constants)
    steps: list         # (op name, input node numbers, params): node numbers count leaves first
    cotangent: object   # dL/d(output), the output being the last step's result
    calls: list         # per backward() call: (edit of .grad before it or None, reuse the graph?)
    margin: float       # the least distance of a kink op's input from its kink


def random_graph(seed):
    """A random program whose values stay moderate (exp of a product can overflow: redrawn)."""
    for attempt in itertools.count():
        graph = _draw_graph(np.random.default_rng([seed, attempt]))
        if graph is not None:
            return graph


def _draw_graph(rng):
    leaves, needs_grad, steps = [], [], []
    values, is_leaf = [], []          # every node's array, in the order drawn (leaves come between steps)
    margin = [math.inf]

    def new_leaf(shape):
        leaves.append(rng.uniform(-1.5, 1.5, shape))
        needs_grad.append(rng.random() > 0.2)
        values.append(leaves[-1])
        is_leaf.append(True)
        return len(values) - 1

    def pick(fits=lambda shape: True, make=None):
        """A node (an earlier result or a leaf, reused) whose shape fits, else a new leaf."""
        nodes = [n for n in range(len(values)) if fits(values[n].shape)]
        if nodes and (make is None or rng.random() < 0.8):
            return nodes[rng.integers(len(nodes))]
        return new_leaf(make)

    for _ in range(int(rng.integers(2, 4))):
        new_leaf(SHAPES[rng.integers(len(SHAPES))])

    for _ in range(int(rng.integers(1, 8))):
        name = list(OPS)[rng.integers(len(OPS))]
        a = pick()
        x = values[a]
        params, inputs = {}, [a]
        if name in ("add", "sub", "mul", "div", "pow_tensor", "where"):
            b = pick(lambda s: broadcasts(s, x.shape), SHAPES[rng.integers(len(SHAPES))]
                     if rng.random() < 0.5 else x.shape)
            if not broadcasts(values[b].shape, x.shape):
                continue
            inputs.append(b)
            if name == "where":
                shape = np.broadcast_shapes(x.shape, values[b].shape)
                params["cond"] = rng.random(shape) < 0.5
        elif name == "pow_int":
            params["k"] = int(rng.integers(2, 4))
        elif name == "clip":
            params.update(lo=-0.5, hi=0.8)
        elif name in ("sum", "mean", "max"):
            axis = None
            if x.ndim and rng.random() < 0.6:
                axes = [int(i) for i in rng.permutation(x.ndim)[:rng.integers(1, x.ndim + 1)]]
                axis = axes[0] if len(axes) == 1 and rng.random() < 0.5 else tuple(axes)
            params.update(axis=axis, keepdims=bool(rng.random() < 0.5))
        elif name == "reshape":
            params["shape"] = (-1,) if rng.random() < 0.5 else tuple(reversed(x.shape))
        elif name in ("transpose", "permute", "softmax", "log_softmax", "getitem", "gather",
                      "concatenate", "stack", "layer_norm", "matmul", "masked_fill", "embedding"):
            if x.ndim == 0:
                continue
            if name == "transpose":
                params.update(d0=0, d1=x.ndim - 1)
            elif name == "permute":
                params["dims"] = tuple(int(i) for i in rng.permutation(x.ndim))
            elif name == "getitem":
                params["index"] = [(0,), (Ellipsis, slice(-1, None)), (slice(0, 1),)][rng.integers(3)]
            elif name == "gather":                           # repeated rows add their gradients
                params["ids"] = rng.integers(0, x.shape[0], size=int(rng.integers(1, 4)))
            elif name == "embedding":
                if x.ndim != 2:
                    continue
                params["ids"] = rng.integers(0, x.shape[0], size=(2, int(rng.integers(1, 3))))
            elif name == "masked_fill":
                params.update(mask=rng.random(x.shape) < 0.5, value=float(rng.choice([0.0, -2.0])))
            elif name in ("concatenate", "stack"):
                inputs.append(pick(lambda s: s == x.shape, x.shape))
            elif name == "layer_norm":
                C = x.shape[-1]
                inputs += [pick(lambda s: s == (C,), (C,)), pick(lambda s: s == (C,), (C,))]
            elif name == "matmul":
                k = x.shape[-1]
                inputs.append(pick(lambda s: len(s) in (1, 2) and s[0] == k,
                                   (k,) if rng.random() < 0.5 else (k, 2)))
        args = [mr.tensor(values[n]) for n in inputs]
        with mr.no_grad():
            out = OPS[name][0](*args, **params).numpy()
        if not np.all(np.isfinite(out)) or np.abs(out).max(initial=0) > 30:
            return None
        margin[0] = min(margin[0], _kink_margin(name, values[inputs[0]], params))
        steps.append((name, inputs, params))
        values.append(out)
        is_leaf.append(False)

    if not steps:
        return None
    # `run_graph` numbers the leaves first, then the steps' results: renumber the inputs so
    drawn = [n for n in range(len(values)) if is_leaf[n]] + [n for n in range(len(values)) if not is_leaf[n]]
    number = {n: i for i, n in enumerate(drawn)}
    steps = [(name, [number[n] for n in inputs], params) for name, inputs, params in steps]
    if not _output_needs_grad(steps, needs_grad):
        return None
    calls = [(None, False)]
    for _ in range(int(rng.integers(0, 3))):
        edit = [None, "scale", "add", "zero", "none"][rng.integers(5)]
        calls.append(((edit, int(rng.integers(len(leaves)))) if edit else None,
                      bool(rng.random() < 0.4)))
    return Graph(leaves, needs_grad, steps, rng.standard_normal(values[drawn[-1]].shape), calls,
                 margin[0])


def _kink_margin(name, x, params):
    if name == "relu":
        return np.abs(x).min(initial=math.inf)
    if name == "clip":
        return min(np.abs(x - params["lo"]).min(initial=math.inf),
                   np.abs(x - params["hi"]).min(initial=math.inf))
    if name == "max" and x.ndim:
        axis = params["axis"]
        axes = tuple(range(x.ndim)) if axis is None else (axis if isinstance(axis, tuple) else (axis,))
        moved = np.moveaxis(x, axes, tuple(range(-len(axes), 0)))
        flat = moved.reshape(moved.shape[:x.ndim - len(axes)] + (-1,))   # the reduced axes as one
        if flat.shape[-1] > 1:
            top = np.sort(flat, axis=-1)
            return (top[..., -1] - top[..., -2]).min(initial=math.inf)
    return math.inf


def _output_needs_grad(steps, needs_grad):
    flags = list(needs_grad)
    for _, inputs, _ in steps:
        flags.append(any(flags[n] for n in inputs))
    return flags[-1]


def run_graph(graph, leaves, ops):
    """The program on ``leaves`` (tensors of one library), with ``ops(name)`` running each op."""
    nodes = list(leaves)
    for name, inputs, params in graph.steps:
        nodes.append(ops(name)(*[nodes[n] for n in inputs], **params))
    return nodes[-1]


def mr_ops(name):
    return OPS[name][0]


def mr_leaves(graph):
    return [mr.tensor(a.copy(), requires_grad=g) for a, g in zip(graph.leaves, graph.needs_grad)]


def edit_grad(grad, edit):
    """The edit ("scale", "add", "zero" or "none") of a NumPy or torch gradient, in place."""
    if grad is None or edit == "none":
        return None
    if edit == "scale":
        grad *= 0.5
    elif edit == "add":
        grad += 1.25
    else:
        grad[...] = 0
    return grad


def backward_calls(graph, leaves, ops, cotangent, after_each):
    """Each call of ``graph.calls``: edit a leaf's ``.grad`` (in place, as a user writes it), run
    backward (on the last graph again when it was retained), then ``after_each(call number)``."""
    out = None
    for i, (edit, reuse) in enumerate(graph.calls):
        if edit is not None:
            leaf = leaves[edit[1]]
            if edit_grad(leaf.grad, edit[0]) is None:
                leaf.grad = None
        if out is None or not reuse:
            out = run_graph(graph, leaves, ops)
        keep = i + 1 < len(graph.calls) and graph.calls[i + 1][1]
        out.backward(cotangent(), retain_graph=keep)
        after_each(i)
    return out


def check_graph_by_identities(seed):
    """Without torch: after the calls, each .grad is the edits applied to one call's gradient summed
    over the calls; every .grad is the leaf's own ndarray; and gradcheck passes away from kinks."""
    graph = random_graph(seed)
    once = mr_leaves(graph)
    run_graph(graph, once, mr_ops).backward(mr.tensor(graph.cotangent))
    leaves = mr_leaves(graph)
    expected = [None] * len(leaves)

    def check(i):
        edit = graph.calls[i][0]
        if edit is not None:
            expected[edit[1]] = edit_grad(expected[edit[1]], edit[0])
        for k, (leaf, single) in enumerate(zip(leaves, once)):
            if single.grad is not None:
                expected[k] = single.grad.copy() if expected[k] is None else expected[k] + single.grad
            if expected[k] is None:
                assert leaf.grad is None, f"leaf {k} has a gradient and should not"
                continue
            np.testing.assert_allclose(leaf.grad, expected[k], rtol=1e-12, atol=1e-12,
                                       err_msg=f"leaf {k} after call {i}")
            assert type(leaf.grad) is np.ndarray and leaf.grad.shape == leaf.shape, f"leaf {k}"
        grads = [leaf.grad for leaf in leaves if leaf.grad is not None]
        assert not any(np.shares_memory(g, h) for g, h in itertools.combinations(grads, 2))

    backward_calls(graph, leaves, mr_ops, lambda: mr.tensor(graph.cotangent), check)
    if graph.margin > 1e-3:
        assert mr.gradcheck(lambda *xs: run_graph(graph, xs, mr_ops), mr_leaves(graph))


def check_graph_against_torch(seed, torch):
    """The forward values and every leaf's .grad after each call, as torch.autograd gives them."""
    graph = random_graph(seed)
    ours = mr_leaves(graph)
    theirs = [torch.tensor(a.copy(), requires_grad=g) for a, g in zip(graph.leaves, graph.needs_grad)]

    def torch_ops(name):
        return lambda *xs, **params: OPS[name][1](torch, *xs, **params)

    def snapshots(leaves, to_numpy, record):
        return lambda i: record.append([None if x.grad is None else to_numpy(x.grad).copy()
                                        for x in leaves])

    def torch_snapshots(i):
        # torch can hand two leaves, and the caller's cotangent, one array as .grad (stack then sum
        # over size-1 axes, torch 2.13: seeds 12872, 27149), so an in-place edit of one changes
        # the others; ours are separate arrays. Each torch .grad is made its own before an edit.
        snapshots(theirs, lambda g: g.numpy(), expected)(i)
        for x in theirs:
            if x.grad is not None:
                x.grad = x.grad.clone()

    got, expected = [], []
    out = backward_calls(graph, ours, mr_ops, lambda: mr.tensor(graph.cotangent),
                         snapshots(ours, lambda g: g, got))
    assert all(x.grad is None or type(x.grad) is np.ndarray for x in ours)
    out_torch = backward_calls(graph, theirs, torch_ops, lambda: torch.tensor(graph.cotangent),
                               torch_snapshots)
    np.testing.assert_allclose(out.numpy(), out_torch.detach().numpy(), rtol=1e-12, atol=1e-12)
    for i, (a, b) in enumerate(zip(got, expected)):
        for k, (g, h) in enumerate(zip(a, b)):
            assert (g is None) == (h is None), f"leaf {k} after call {i}: {g} vs torch {h}"
            if g is not None:
                assert g.shape == h.shape, f"leaf {k} after call {i}"
                np.testing.assert_allclose(g, h, rtol=1e-10, atol=1e-12,
                                           err_msg=f"leaf {k} after call {i}")


# ===================================================================================================
# random optimizer runs: the same events applied to minirlhf, torch.optim and a NumPy reference


class Run(NamedTuple):
    kind: str           # "AdamW" or "SGD"
    defaults: dict      # the optimizer's hyperparameters
    init: list          # every parameter's first values (the pool: not all are in a group)
    groups: list        # [(parameter numbers, hyperparameters)] at the start
    steps: list         # per step: {"edits": [...], "grads": [...], "clip": ..., "lr": ...}


def _hyper(kind, rng):
    if kind == "AdamW":
        return {"lr": float(rng.choice([0.1, 0.03])), "betas": (0.9, float(rng.choice([0.95, 0.999]))),
                "eps": float(rng.choice([1e-8, 1e-6])), "weight_decay": float(rng.choice([0.0, 0.1]))}
    return {"lr": float(rng.choice([0.1, 0.03])), "momentum": float(rng.choice([0.0, 0.9])),
            "weight_decay": float(rng.choice([0.0, 0.01]))}


def random_run(seed):
    rng = np.random.default_rng([seed, 7])
    kind = ["AdamW", "SGD"][seed % 2]
    pool = int(rng.integers(4, 8))
    shapes = [SHAPES[i] for i in rng.integers(len(SHAPES), size=pool)]
    init = [rng.standard_normal(s) for s in shapes]
    order = [int(i) for i in rng.permutation(pool)]
    first = int(rng.integers(1, 4))
    groups = [(order[:first], {})]
    if rng.random() < 0.5:
        groups.append((order[first:first + int(rng.integers(1, 3))], _hyper(kind, rng)))
    lists = [list(g) for g, _ in groups]
    steps, total = [], int(rng.integers(4, 9))
    for t in range(1, total + 1):
        edits = []
        for _ in range(int(rng.integers(0, 3))):
            what = rng.choice(["remove", "insert", "shuffle", "move", "add_group", "replace",
                               "round_trip"])
            k = int(rng.integers(len(lists)))
            free = [i for i in range(pool) if not any(i in g for g in lists)]
            if what == "remove" and lists[k]:
                lists[k].pop(int(rng.integers(len(lists[k]))))
            elif what == "insert" and free:
                lists[k].insert(int(rng.integers(len(lists[k]) + 1)), free[rng.integers(len(free))])
            elif what == "shuffle":
                lists[k] = [lists[k][i] for i in rng.permutation(len(lists[k]))]
            elif what == "move" and len(lists) > 1 and lists[k]:
                i = lists[k].pop(int(rng.integers(len(lists[k]))))
                lists[(k + 1) % len(lists)].append(i)
            elif what == "add_group" and free:
                lists.append([free[rng.integers(len(free))]])
                edits.append(("add_group", list(lists[-1]), _hyper(kind, rng)))
                continue
            elif what == "replace":
                i = int(rng.integers(pool))
                edits.append(("replace", i, "scale" if rng.random() < 0.5 else
                              rng.standard_normal(shapes[i])))
                continue
            elif what == "round_trip":
                edits.append(("round_trip",))
                continue
            else:
                continue
            edits.append(("set", k, list(lists[k])))
        frozen = rng.random(pool) < 0.2
        grads = [None if frozen[i] else rng.standard_normal(shapes[i]) for i in range(pool)]
        clip = float(rng.choice([0.5, 2.0])) if rng.random() < 0.4 else None
        lr = lr_schedule(t, 0.1, 2, total, 0.01) if seed % 3 == 0 else None
        steps.append({"edits": edits, "grads": grads, "clip": clip, "lr": lr})
    return Run(kind, _hyper(kind, rng), init, groups, steps)


class Reference:
    """A plain per-parameter AdamW/SGD, as PyTorch defines them, state keyed by ``id(param)``."""

    class Param:
        def __init__(self, data):
            self.data, self.grad = data, None

    def __init__(self, run):
        self.kind = run.kind
        self.params = [self.Param(a.copy()) for a in run.init]
        self.param_groups = [{**run.defaults, **hyper, "params": [self.params[i] for i in numbers]}
                             for numbers, hyper in run.groups]
        self.defaults = run.defaults
        self.state = {}

    def add_param_group(self, group):
        self.param_groups.append({**self.defaults, **group})

    def round_trip(self):
        """What state_dict() then load_state_dict() keeps: the state of parameters in a group."""
        kept = {id(p) for g in self.param_groups for p in g["params"]}
        self.state = {k: s for k, s in self.state.items() if k in kept}

    def clip(self, max_norm):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        total = math.sqrt(sum(float((g * g).sum()) for g in grads))
        if max_norm / (total + 1e-6) < 1:
            for g in grads:
                g *= max_norm / (total + 1e-6)

    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group, self.state.setdefault(id(p), {"step": 0}))

    def _update(self, p, group, s):
        s["step"] += 1
        g, lr, wd = p.grad, group["lr"], group["weight_decay"]
        if self.kind == "SGD":
            g = g + wd * p.data
            if group["momentum"]:
                s["buf"] = g.copy() if "buf" not in s else group["momentum"] * s["buf"] + g
                g = s["buf"]
            p.data = p.data - lr * g
            return
        (beta1, beta2), t = group["betas"], s["step"]
        s["m"] = beta1 * s.get("m", 0.0) + (1 - beta1) * g
        s["v"] = beta2 * s.get("v", 0.0) + (1 - beta2) * g * g
        p.data = p.data * (1 - lr * wd)
        m_hat, v_hat = s["m"] / (1 - beta1 ** t), s["v"] / (1 - beta2 ** t)
        p.data = p.data - lr * m_hat / (np.sqrt(v_hat) + group["eps"])


class Ours:
    """minirlhf's optimizer driven by the events of a `Run`."""

    def __init__(self, run):
        self.make = AdamW if run.kind == "AdamW" else SGD
        self.params = [Parameter(a.copy()) for a in run.init]
        self.defaults = run.defaults
        self.optimizer = self.make([{"params": [self.params[i] for i in numbers], **hyper}
                              for numbers, hyper in run.groups], **run.defaults)
        self.param_groups = self.optimizer.param_groups

    def add_param_group(self, group):
        self.optimizer.add_param_group(group)

    def round_trip(self):
        again = self.make([{"params": list(g["params"])} for g in self.optimizer.param_groups],
                          **self.defaults)
        again.load_state_dict(self.optimizer.state_dict())
        self.optimizer, self.param_groups = again, again.param_groups

    def clip(self, max_norm):
        clip_grad_norm_([p for g in self.param_groups for p in g["params"]], max_norm)

    def step(self):
        self.optimizer.step()


class Torch(Ours):
    """torch.optim driven by the same events."""

    def __init__(self, run, torch):
        self.torch = torch
        self.make = torch.optim.AdamW if run.kind == "AdamW" else torch.optim.SGD
        self.params = [torch.tensor(a.copy(), requires_grad=True) for a in run.init]
        self.defaults = run.defaults
        self.optimizer = self.make([{"params": [self.params[i] for i in numbers], **hyper}
                              for numbers, hyper in run.groups], **run.defaults)
        self.param_groups = self.optimizer.param_groups

    def round_trip(self):
        # torch's state_dict() fails on the state of a parameter no longer in a group: drop it
        kept = {id(p) for g in self.param_groups for p in g["params"]}
        for p in [p for p in self.optimizer.state if id(p) not in kept]:
            del self.optimizer.state[p]
        super().round_trip()

    def clip(self, max_norm):
        params = [p for g in self.param_groups for p in g["params"]]
        self.torch.nn.utils.clip_grad_norm_(params, max_norm)


def replay(run, side, wrap, after_step):
    """Apply the run's events to one side; ``wrap`` makes an array that side's ``.data``/``.grad``."""
    for t, step in enumerate(run.steps):
        for edit in step["edits"]:
            if edit[0] == "set":
                side.param_groups[edit[1]]["params"][:] = [side.params[i] for i in edit[2]]
            elif edit[0] == "add_group":
                side.add_param_group({"params": [side.params[i] for i in edit[1]], **edit[2]})
            elif edit[0] == "replace":
                p = side.params[edit[1]]
                p.data = p.data * 0.5 if isinstance(edit[2], str) else wrap(edit[2].copy())
            else:
                side.round_trip()
        for p, g in zip(side.params, step["grads"]):
            p.grad = None if g is None else wrap(g.copy())
        if step["clip"] is not None:
            side.clip(step["clip"])
        if step["lr"] is not None:
            for group in side.param_groups:
                group["lr"] = step["lr"]
        side.step()
        after_step(t)


def check_run_against(seed, make_other, wrap, unwrap):
    run = random_run(seed)
    ours, other = Ours(run), make_other(run)
    values = []
    replay(run, other, wrap, lambda t: values.append([unwrap(p.data).copy() for p in other.params]))

    def check(t):
        for i, (p, expected) in enumerate(zip(ours.params, values[t])):
            assert type(p.data) is np.ndarray and p.shape == expected.shape, f"parameter {i}"
            np.testing.assert_allclose(p.data, expected, rtol=1e-10, atol=1e-12,
                                       err_msg=f"{run.kind}: parameter {i} after step {t + 1}")
    replay(run, ours, lambda a: a, check)


def check_run_against_reference(seed):
    check_run_against(seed, Reference, lambda a: a, lambda a: np.asarray(a))


def check_run_against_torch(seed, torch):
    check_run_against(seed, lambda run: Torch(run, torch), torch.tensor, lambda a: a.detach().numpy())


# ===================================================================================================
# the tests


@pytest.mark.parametrize("seed", range(CI_CASES))
def test_random_graph_gradients_add_up_and_pass_gradcheck(seed):
    on_seed(check_graph_by_identities, seed)


@pytest.mark.parametrize("seed", range(CI_CASES))
def test_random_optimizer_run_matches_a_plain_per_parameter_reference(seed):
    on_seed(check_run_against_reference, seed)


def fuzz_against_torch(check):
    """``check(seed, torch)`` on every seed of `fuzz_seeds`: the number that ran clean."""
    torch = pytest.importorskip("torch")
    count = 0
    for seed in fuzz_seeds():
        on_seed(check, seed, torch)
        count += 1
    return count


def test_random_graphs_match_torch_autograd():
    print(f"\n{fuzz_against_torch(check_graph_against_torch)} random graphs matched torch.autograd")


def test_random_optimizer_runs_match_torch_optim():
    print(f"\n{fuzz_against_torch(check_run_against_torch)} random optimizer runs matched torch.optim")
