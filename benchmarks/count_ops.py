"""How many array operations one GPT training step makes, op by op: a GPU's kernel launches, counted
on the CPU.

    python benchmarks/count_ops.py                     # the medium GPT, batch 1 (the count does not
    python benchmarks/count_ops.py --config small      #   depend on the batch)

On a GPU, each array operation of a step is at least one kernel that Python must launch, at 10–25
µs of host time each with CuPy (measured on an H100 machine): a step of the medium GPT there is
bound by those launches, not by arithmetic. This script counts them without a GPU. The model's
arrays are a NumPy subclass that counts every operation done with it (each ufunc call, reduction,
copy, creation, concatenation, gather, and reshape that has to copy), and every call of the array
module (`xp`) is counted too.
CPU threads are off (one block per op, as on a GPU), so the count is what CuPy would launch, give
or take the few operations one library spells with more kernels than the other.

It prints the kernels of a step by the op they happen in (a `Function`'s forward or backward, the
optimizer, or the engine itself), most first; views and allocations are not kernels and are left
out. `counting()` is also what tests/test_count_ops.py uses to pin the counts of single ops.
"""

import argparse
import collections
import contextlib
import sys
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
import minirlhf.functional as F  # noqa: E402
from minirlhf import backend  # noqa: E402
from minirlhf import kernels as row_kernels  # noqa: E402
from minirlhf.model import GPT, GPTConfig  # noqa: E402
from minirlhf.optim import AdamW, Optimizer, param_groups  # noqa: E402
from minirlhf.tensor import Function, Tensor  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpt import CONFIGS  # noqa: E402

# kernels of one training step, as counted on 2026-11-30 (benchmarks/README.md has their history);
# `--check` fails when a change makes more
EXPECTED_KERNELS = {"medium": 721}

COUNTS = collections.Counter()   # (where, what) -> operations
NO_KERNEL = {"result_type", "swapaxes", "transpose", "broadcast_to", "expand_dims", "squeeze",
             "moveaxis", "ndim", "shape", "size", "iscomplexobj", "isscalar"}   # metadata, views
ALLOCATION = {"empty", "empty_like"}     # memory from the pool, no kernel
COPY_IF_NEEDED = {"asarray", "asanyarray", "ascontiguousarray"}   # a kernel only when they copy


def where():
    """The op the current array operation belongs to: the nearest Function or Optimizer method
    on the call stack, else the engine."""
    frame = sys._getframe(2)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, (Function, Optimizer)):
            return f"{type(owner).__name__}.{frame.f_code.co_name}"
        frame = frame.f_back
    return "engine"


def count(what):
    COUNTS[(where(), what)] += 1


def plain(a):
    return a.view(np.ndarray) if isinstance(a, Counted) else a


def counted(result):
    if isinstance(result, np.ndarray) and not isinstance(result, Counted):
        return result.view(Counted)
    if isinstance(result, tuple):
        return tuple(counted(r) for r in result)
    if isinstance(result, list):
        return [counted(r) for r in result]
    return result


def unwrap(value):
    if isinstance(value, (tuple, list)):
        return type(value)(unwrap(v) for v in value)
    return plain(value)


class Counted(np.ndarray):
    """A NumPy array that counts the operations done with it (a view of it stays counted)."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        count(ufunc.__name__ if method == "__call__" else f"{ufunc.__name__}.{method}")
        if "out" in kwargs:
            kwargs["out"] = unwrap(kwargs["out"])
        result = getattr(ufunc, method)(*unwrap(inputs), **kwargs)
        return counted(result)

    def __array_function__(self, func, types_, args, kwargs):
        count(func.__name__)
        return counted(func(*unwrap(args), **{k: unwrap(v) for k, v in kwargs.items()}))

    def __setitem__(self, key, value):
        count("setitem")
        plain(self)[unwrap(key)] = plain(value)

    def __getitem__(self, key):
        fancy = any(isinstance(k, np.ndarray) for k in (key if isinstance(key, tuple) else (key,)))
        if fancy:
            count("gather")
        return counted(plain(self)[unwrap(key)])

    @property
    def base(self):
        """As the array had been made by NumPy itself: `counted` wraps fresh arrays in a view, which
        must not look like a view to code that asks (the engine copies gradients that are views)."""
        base = np.ndarray.base.__get__(self)
        return base.base if type(base) is np.ndarray else base

    def reshape(self, *shape, **kwargs):
        """A view where the layout allows one; otherwise a copy, which is a kernel."""
        result = plain(self).reshape(*shape, **kwargs)
        if not np.shares_memory(result, plain(self)):
            count("reshape (a copy)")
        return counted(result)

    def copy(self, order="C"):
        count("copy")
        return counted(plain(self).copy(order))

    def astype(self, dtype, *args, **kwargs):
        if kwargs.get("copy", True) or np.dtype(dtype) != self.dtype:
            count("astype")
        return counted(plain(self).astype(dtype, *args, **kwargs))


def counting_numpy():
    """The ``xp`` the ops get: NumPy, with each function call counted and the arrays it returns
    counted. It is not ``numpy`` itself, so code that asks ``xp is np`` takes its CuPy path."""
    module = types.ModuleType("numpy")

    def wrap(fn, name):
        def call(*args, **kwargs):
            args, kwargs = unwrap(args), {k: unwrap(v) for k, v in kwargs.items()}
            result = fn(*args, **kwargs)
            given = args[0] if args else None
            if name not in COPY_IF_NEEDED or not (isinstance(given, np.ndarray)
                                                  and np.shares_memory(result, given)):
                count(name)
            return counted(result)
        return call

    for name in dir(np):
        value = getattr(np, name)
        if isinstance(value, np.ufunc):       # counted by the arrays they are called on
            setattr(module, name, value)
        elif callable(value) and not isinstance(value, type) and not name.startswith("_"):
            setattr(module, name, wrap(value, name))
        else:
            setattr(module, name, value)
    return module


@contextlib.contextmanager
def counting():
    """``with counting() as kernels:`` inside, the ops run on `Counted` arrays one block at a time
    (as on a GPU); ``kernels()`` gives {(op, operation): count} since the last
    ``kernels.clear()``."""
    saved = backend.get_array_module, row_kernels.MIN_PARALLEL_NUMBERS, row_kernels.MIN_PARALLEL_PRODUCTS
    xp = counting_numpy()
    backend.get_array_module = lambda *arrays: xp
    row_kernels.MIN_PARALLEL_NUMBERS = row_kernels.MIN_PARALLEL_PRODUCTS = float("inf")   # one block per op
    COUNTS.clear()

    def kernels():
        return {k: n for k, n in COUNTS.items() if k[1] not in NO_KERNEL | ALLOCATION}
    kernels.clear = COUNTS.clear
    try:
        yield kernels
    finally:
        backend.get_array_module, row_kernels.MIN_PARALLEL_NUMBERS, row_kernels.MIN_PARALLEL_PRODUCTS = saved


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="medium", choices=sorted(CONFIGS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--top", type=int, default=30, help="rows of the per-op table")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if the step makes more kernels than EXPECTED_KERNELS says")
    args = parser.parse_args()

    L, C, H, T, _, V = CONFIGS[args.config]
    T = min(T, 64)                                   # the count depends on neither B nor T
    model = GPT(GPTConfig(block_size=T, vocab_size=V, n_layer=L, n_head=H, n_embd=C), seed=0)
    for p in model.parameters():
        p.data = p.data.view(Counted)
    optimizer = AdamW(param_groups(model, 0.1), lr=1e-4)
    rng = np.random.default_rng(0)
    x = Tensor(rng.integers(0, V, (args.batch, T)).view(Counted))
    y = Tensor(rng.integers(0, V, (args.batch, T)).view(Counted))

    def step():
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    with counting() as kernels:
        step()                                       # the first step builds the optimizer's state
        kernels.clear()
        step()
        counts = kernels()
    allocations = sum(n for (_, what), n in COUNTS.items() if what in ALLOCATION)
    by_op = collections.Counter()
    for (op, _), n in counts.items():
        by_op[op] += n
    print(f"{args.config}: {sum(counts.values())} kernels and {allocations} allocations in a "
          f"training step ({L} layers, {sum(1 for _ in model.parameters())} parameter arrays)\n")
    print("| op | kernels | the most frequent |")
    print("|---|---|---|")
    for op, n in by_op.most_common(args.top):
        kinds = sorted(((m, what) for (o, what), m in counts.items() if o == op), reverse=True)[:4]
        print(f"| {op} | {n} | {', '.join(f'{what} {m}' for m, what in kinds)} |")
    expected = EXPECTED_KERNELS.get(args.config)
    if args.check and expected is not None and sum(counts.values()) > expected:
        print(f"\n{args.config}: {sum(counts.values())} kernels, more than the {expected} expected",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
