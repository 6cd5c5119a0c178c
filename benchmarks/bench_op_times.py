"""Where a training step's time goes, op by op: ours beside PyTorch's, on the CPU.

    python benchmarks/bench_op_times.py                       # tiny and small, 2 threads
    python benchmarks/bench_op_times.py --configs medium --steps 6

Ours: the time spent inside each `Function`'s forward and backward during the steps (each wrapped
in a timer), and around the optimizer's step. PyTorch's: `torch.profiler`'s self CPU time of its
ops over the same steps of bench_gpt.py's model with `scaled_dot_product_attention`. Both are
grouped into the same rows (linear layers, attention, GELU, LayerNorm, cross-entropy, AdamW) and
printed as milliseconds a step. Each side runs in its own process with ``--threads`` threads, as
in bench_gpt.py; the timers cost each side a little, so the rows say where the time goes, and
bench_gpt.py says how fast the whole step is. Without PyTorch only our column is printed.
"""

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gpt  # noqa: E402  (it puts this checkout's minirlhf on the path)

# row: (our Function names, PyTorch profiler names)
ROWS = {
    "linear layers": (["Linear"], ["aten::mm", "aten::addmm"]),
    "attention": (["SelfAttention", "CausalAttention"],
                  ["aten::_scaled_dot_product_flash_attention_for_cpu",
                   "aten::_scaled_dot_product_flash_attention_for_cpu_backward"]),
    "GELU": (["GELU"], ["aten::gelu", "aten::gelu_backward"]),
    "LayerNorm": (["LayerNorm"], ["aten::native_layer_norm", "aten::native_layer_norm_backward"]),
    "cross-entropy": (["CrossEntropy"], ["aten::_log_softmax", "aten::_log_softmax_backward_data",
                                         "aten::nll_loss_forward", "aten::nll_loss_backward"]),
    "AdamW": (["optimizer"], ["Optimizer.step#AdamW.step"]),
}


def ours(cfg_name, steps):
    """{name: seconds a step} inside each Function's forward + backward, and the optimizer's."""
    import minirlhf.functional as F
    from minirlhf.tensor import Function

    spent = collections.defaultdict(float)

    def timer(method, name):
        def timed(self, *args):
            t0 = time.perf_counter()
            result = method(self, *args)
            spent[name] += time.perf_counter() - t0
            return result
        return timed

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    for cls in set(subclasses(Function)):
        if "forward" in cls.__dict__:
            cls.forward = timer(cls.forward, cls.__name__)
        if "backward" in cls.__dict__:
            cls.backward = timer(cls.backward, cls.__name__)
    model, optimizer, x, y = bench_gpt.our_training(cfg_name, "cpu")

    def step():
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        t0 = time.perf_counter()
        optimizer.step()
        spent["optimizer"] += time.perf_counter() - t0

    for _ in range(2):                               # warm-up steps, not counted
        step()
    spent.clear()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    spent["step"] = time.perf_counter() - t0
    return {name: seconds / steps for name, seconds in spent.items()}


def pytorch(cfg_name, steps):
    """{profiler name: seconds a step}: self CPU time, and the optimizer step's total."""
    from torch.profiler import ProfilerActivity, profile

    spent = {}

    def profiled_steps(step, sync, n):               # in place of bench_gpt's timed_steps
        for _ in range(2):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(n):
                step()
            spent["step"] = (time.perf_counter() - t0) / n
        for event in prof.key_averages():
            total = event.cpu_time_total if event.key.startswith("Optimizer.") else event.self_cpu_time_total
            spent[event.key] = total / 1e6 / n       # µs -> seconds a step
        return 1.0

    bench_gpt.timed_steps = profiled_steps
    bench_gpt.worker_torch(cfg_name, "train", "cpu", steps, attention="sdpa")
    return spent


def run(side, cfg_name, steps, threads):
    n = str(threads)
    env = {**os.environ, "OMP_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "MKL_NUM_THREADS": n,
           "MINIRLHF_NUM_THREADS": n}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", side, cfg_name,
                           str(steps)], capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{side} {cfg_name}: {proc.stderr.strip()}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "small"],
                        choices=[c for c in bench_gpt.CONFIGS if c != "gpt2"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        side, cfg_name, steps = args.worker
        print(json.dumps((ours if side == "ours" else pytorch)(cfg_name, int(steps))))
        return
    with_torch = bench_gpt.torch_available()
    print(f"ms a step, {args.steps} steps, {args.threads} threads a process"
          + ("" if with_torch else "; PyTorch not installed") + "\n")
    print("| config | op | ours | PyTorch (SDPA) |\n|---|---|---|---|")
    for cfg_name in args.configs:
        mine = run("ours", cfg_name, args.steps, args.threads)
        theirs = run("torch", cfg_name, args.steps, args.threads) if with_torch else {}
        for row, (our_names, their_names) in list(ROWS.items()) + [("whole step", (["step"], ["step"]))]:
            a = sum(mine.get(name, 0.0) for name in our_names)
            b = sum(theirs.get(name, 0.0) for name in their_names)
            print(f"| {cfg_name} | {row} | {1000 * a:.1f} | " + (f"{1000 * b:.1f} |" if with_torch else "— |"))


if __name__ == "__main__":
    main()
