"""Where one GPT training step's time goes: forward, backward, optimizer, each on its own.

    python benchmarks/bench_step_parts.py                          # medium on the CPU
    python benchmarks/bench_step_parts.py --device cuda --configs medium gpt2

For each part it prints two times, medians over ``--steps`` steps:

- host: until the call returns. On a GPU this is the time Python takes to enqueue the part's
  kernels; if it is about as long as the whole part, the GPU waits on Python (launch-bound) and
  fewer, larger operations are what helps, not faster kernels.
- total: until the device has finished the part as well (a synchronize after each part).

On the CPU the two are the same. The configs are those of bench_gpt.py (the model, batch, AdamW
and float32 are as there), so the parts of a step here add up to one step there, give or take the
synchronizations in between.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
import minirlhf.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpt import CONFIGS, _sync, our_training  # noqa: E402

PARTS = ("forward", "backward", "optimizer")


def measure(cfg_name, device, steps):
    """{part: (median host seconds, median total seconds)} for one config."""
    model, optimizer, x, y = our_training(cfg_name, device)
    sync = _sync(device)
    times = {part: [] for part in PARTS}

    def timed(part, fn):
        sync()
        t0 = time.perf_counter()
        result = fn()
        host = time.perf_counter() - t0
        sync()
        times[part].append((host, time.perf_counter() - t0))
        return result

    for _ in range(steps + 1):                      # the first step warms up, then is dropped
        loss = timed("forward", lambda: F.cross_entropy(model(x), y))
        optimizer.zero_grad()
        timed("backward", loss.backward)
        timed("optimizer", optimizer.step)
    return {part: tuple(statistics.median(t[i] for t in times[part][1:]) for i in (0, 1))
            for part in PARTS}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--configs", nargs="+", default=["medium"], choices=sorted(CONFIGS))
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    print(f"| config | part | host ms | total ms | host / total |  ({args.device}, "
          f"medians of {args.steps} steps)")
    print("|---|---|---|---|---|")
    for cfg_name in args.configs:
        parts = measure(cfg_name, args.device, args.steps)
        for part, (host, total) in parts.items():
            print(f"| {cfg_name} | {part} | {1000 * host:.1f} | {1000 * total:.1f} | "
                  f"{host / total:.2f} |")
        host, total = (sum(p[i] for p in parts.values()) for i in (0, 1))
        print(f"| {cfg_name} | step | {1000 * host:.1f} | {1000 * total:.1f} | "
              f"{host / total:.2f} |")


if __name__ == "__main__":
    main()
