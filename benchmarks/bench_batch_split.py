"""KV-cache sampling with the batch split across threads: does it beat splitting each product?

    python benchmarks/bench_batch_split.py                      # small and medium, 2 threads, 4 rounds
    python benchmarks/bench_batch_split.py --configs medium --rounds 6

minirlhf's threads split each op (`kernels.for_rows`), so a sampling step of a batch of 32 wakes the
pool once per product big enough to split, and small's products are too small to split at all. The
other way: give each thread half of the batch for a whole decoding step, one wake per generated
token, every op inside on the thread that runs it. Both are timed here in the same process,
alternating, with the model, prompts and token count of bench_gpt.py's sampling row (greedy, so
the two do the same work):

- ``per op``: one `model(...)` call on all 32 rows a step, its ops split as usual;
- ``per half``: `for_rows` hands rows 0:16 and 16:32 to the two threads, each with its own cache.

The answer decides whether the sampler should split its batch (benchmarks/README.md has it).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
import numpy as np  # noqa: E402

from minirlhf import kernels  # noqa: E402
from minirlhf.tensor import no_grad  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpt import (CONFIGS, SAMPLE_PROMPT_LEN, SAMPLE_PROMPTS, new_tokens,  # noqa: E402
                       our_model)


def decode(model, prompts, n_new, parts):
    """Greedy decoding of ``n_new`` tokens after ``prompts`` (B, T0), the batch cut into ``parts``
    that the threads share, one part a thread (1: one call on all rows)."""
    B = prompts.shape[0]
    bounds = [B * i // parts for i in range(parts + 1)]
    caches = [model.new_kv_cache(hi - lo, max_length=prompts.shape[1] + n_new)
              for lo, hi in zip(bounds[:-1], bounds[1:])]
    last = [prompts[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]    # what each part feeds next

    def part(lo, hi):                                   # parts lo:hi of the batch, one step each
        for i in range(lo, hi):
            logits = model(last[i], kv_cache=caches[i])                   # (b, T, V)
            last[i] = np.argmax(logits.data[:, -1:, :], axis=-1)          # (b, 1)

    for _ in range(n_new):
        if parts == 1:
            part(0, 1)
        else:   # a row_size so large that for_rows always splits: one wake a step
            kernels.for_rows(part, parts, 1 << 40, blas=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["small", "medium"], choices=list(CONFIGS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args(argv)
    kernels.set_num_threads(args.threads)
    print(f"{args.threads} threads; {SAMPLE_PROMPTS} prompts of {SAMPLE_PROMPT_LEN} tokens; "
          f"tokens/s of each way, alternating, {args.rounds} rounds")
    for cfg in args.configs:
        L, C, H, T, B, V = CONFIGS[cfg]
        model = our_model(cfg, "cpu")
        model.eval()
        prompts = np.random.default_rng(0).integers(0, V, (SAMPLE_PROMPTS, SAMPLE_PROMPT_LEN))
        n_new = new_tokens(T)
        speeds = {1: [], args.threads: []}
        with no_grad():
            for parts in speeds:                        # warm-up
                decode(model, prompts, 4, parts)
            for _ in range(args.rounds):
                for parts in speeds:
                    start = time.perf_counter()
                    decode(model, prompts, n_new, parts)
                    speeds[parts].append(SAMPLE_PROMPTS * n_new / (time.perf_counter() - start))
        ratios = [h / o for o, h in zip(speeds[1], speeds[args.threads])]
        print(f"{cfg}: per op {statistics.median(speeds[1]):,.0f} tok/s, per half "
              f"{statistics.median(speeds[args.threads]):,.0f} tok/s, per half / per op "
              f"{statistics.median(ratios):.2f} (rounds: {' '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
