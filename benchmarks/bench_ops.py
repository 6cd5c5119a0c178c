"""Per-op overhead of minirlhf Tensors against the same computation in raw NumPy.

    python benchmarks/bench_ops.py [--sizes 4 64 512] [--ops mul add exp sum matmul] [--repeat 7]

On a shared machine, ``OPENBLAS_NUM_THREADS=1`` keeps the matmul timings steady.

For each op and square float32 size it times, with `timeit`, the best of ``--repeat`` runs of as
many calls as fill about 0.2 s (runs of ours and raw alternate, so a busy machine slows both alike):

- forward: the Tensor op on inputs that require grad (so the graph is recorded), against the
  NumPy expression;
- forward+backward: the op and ``backward`` into fresh leaf gradients, against the NumPy forward
  followed by the hand-written NumPy backward (for mul: ``a*b``, then ``gy*b`` and ``gy*a``; for
  add the gradients are ``gy`` itself, for sum a broadcast view), kept until the next call as .grad is.

The ratio ours/raw is the price of the graph. Targets: fwd+bwd of elementwise ops at 64x64 within 2x,
matmul at 512x512 within 1.1x.
"""

import argparse
import sys
import timeit
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
import minirlhf as mr  # noqa: E402


def make_cases(n, rng):
    a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
    gy = rng.standard_normal((n, n)).astype(np.float32)
    ta, tb = mr.tensor(a, requires_grad=True), mr.tensor(b, requires_grad=True)

    def ours(op, cotangent):
        def fwd_bwd():
            ta.grad = tb.grad = None
            op(ta, tb).backward(cotangent)
        return fwd_bwd

    # raw NumPy: the forward, then the backward written by hand. Its gradients are kept until the
    # next call, as .grad is kept until the optimizer step (freeing and re-allocating large arrays
    # has a cost of its own, which both sides then pay)
    held = {}

    def raw(backward):
        def fwd_bwd():
            held.clear()
            held.update(backward())
        return fwd_bwd

    def mul_raw():
        a * b
        return {"a": gy * b, "b": gy * a}

    def add_raw():
        a + b
        return {"a": gy, "b": gy}

    def exp_raw():
        y = np.exp(a)
        return {"a": gy * y}

    def sum_raw():
        a.sum()
        return {"a": np.broadcast_to(np.float32(1.0), a.shape)}

    def matmul_raw():
        a @ b
        return {"a": gy @ b.T, "b": a.T @ gy}

    one = np.float32(1.0)
    return [
        # name, raw forward, ours forward, raw fwd+bwd, ours fwd+bwd
        ("mul", lambda: a * b, lambda: ta * tb, raw(mul_raw), ours(lambda x, y: x * y, gy)),
        ("add", lambda: a + b, lambda: ta + tb, raw(add_raw), ours(lambda x, y: x + y, gy)),
        ("exp", lambda: np.exp(a), lambda: ta.exp(), raw(exp_raw), ours(lambda x, y: x.exp(), gy)),
        ("sum", lambda: a.sum(), lambda: ta.sum(), raw(sum_raw), ours(lambda x, y: x.sum(), one)),
        ("matmul", lambda: a @ b, lambda: ta @ tb, raw(matmul_raw), ours(lambda x, y: x @ y, gy)),
    ]


def paired_best_times(raw, ours, repeat):
    """Seconds per call of each, the minimum over ``repeat`` runs (the least disturbed ones).

    The runs of the two alternate, so that a busy machine slows both alike.
    """
    timers = [timeit.Timer(raw), timeit.Timer(ours)]
    number = max(1, min(t.autorange()[0] for t in timers))
    best = [float("inf"), float("inf")]
    for _ in range(repeat):
        for i, timer in enumerate(timers):
            best[i] = min(best[i], timer.timeit(number) / number)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 64, 512])
    parser.add_argument("--ops", nargs="+", default=["mul", "add", "exp", "sum", "matmul"])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    print("| op | size | fwd raw µs | fwd ours µs | fwd ratio | fwd+bwd raw µs | fwd+bwd ours µs | "
          "fwd+bwd ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        for name, raw_f, ours_f, raw_fb, ours_fb in make_cases(n, rng):
            if name not in args.ops:
                continue
            t = [x * 1e6 for x in paired_best_times(raw_f, ours_f, args.repeat)
                 + paired_best_times(raw_fb, ours_fb, args.repeat)]
            print(f"| {name} | {n}x{n} | {t[0]:.2f} | {t[1]:.2f} | {t[1] / t[0]:.2f} | "
                  f"{t[2]:.2f} | {t[3]:.2f} | {t[3] / t[2]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
