"""GPT training and sampling speed, ours against the same model in PyTorch, side by side.

    python benchmarks/bench_gpt.py                              # the whole table: tiny, small, medium
    python benchmarks/bench_gpt.py --anchor sdpa --configs small --rounds 6
    python benchmarks/bench_gpt.py --device cuda --configs medium gpt2
    python benchmarks/bench_gpt.py --base-tree /tmp/old    # also an older checkout: before/after

Each measurement runs in its own process, alternating ours and PyTorch (A B A B ...): NumPy's and
PyTorch's BLAS thread pools in one process slow each other down by up to 100x, and a shared machine
drifts, so only ratios measured in one run mean anything. Every process gets ``--threads``
threads (2 by default: OMP, OpenBLAS, minirlhf and torch.set_num_threads). Two PyTorch anchors
(``--anchor``, both by default): "sdpa", attention by `F.scaled_dot_product_attention`, as PyTorch
users write it today, and "manual", the attention written out by hand. Per config it reports:

- training tokens/s: forward, cross-entropy, backward and an AdamW step, float32;
- sampling tokens/s: 32 prompts of 16 tokens, 64 new tokens each, temperature 1, with the KV cache,
  against the first anchor (and ours without the cache with ``--nocache``);
- peak memory of training: the peak resident set above what the process held before its first step
  (CPU), or the allocator's peak (GPU);
- our share of the float32 matmul peak, measured in the same run with one large GEMM.

PyTorch is optional (`pip install torch==2.13.0`); without it only our numbers are printed.

``--base-tree DIR`` measures a second minirlhf, the package in DIR/minirlhf (an older commit, say:
``git archive OLD minirlhf | tar -x -C DIR``), in the same rounds (ours, base, PyTorch in turn),
and prints its table too: before and after, each against PyTorch, side by side in one run.
"""

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

# the minirlhf measured: this checkout's, or the tree a --base-tree worker is told to use
sys.path.insert(0, os.environ.get("MINIRLHF_TREE") or str(Path(__file__).resolve().parents[1]))

CONFIGS = {  # name: (n_layer, n_embd, n_head, block_size, batch_size, vocab_size)
    "tiny": (2, 64, 4, 64, 16, 256),
    "small": (4, 128, 4, 128, 16, 256),
    "medium": (6, 384, 6, 256, 8, 256),
    "gpt2": (12, 768, 12, 1024, 8, 50304),
}
SAMPLE_PROMPTS, SAMPLE_PROMPT_LEN, SAMPLE_NEW = 32, 16, 64   # 32 prompts of 16 tokens, 64 new each
SAMPLE_REPEATS = 3                      # sampling runs timed per process (median taken)
STEPS = {  # timed training steps: about a second or more of work per process
    "cpu": {"tiny": 40, "small": 30, "medium": 4, "gpt2": 1},
    "cuda": {"tiny": 100, "small": 100, "medium": 50, "gpt2": 10},
}


def new_tokens(block_size):
    """Tokens to sample: 64, or fewer when the context would overflow (tiny's is 64)."""
    return min(SAMPLE_NEW, block_size - SAMPLE_PROMPT_LEN)


def flops_per_token(L, C, T, V):
    """Training FLOPs per token: 6 per parameter-token (forward 2, backward 4) plus attention."""
    params = 12 * L * C * C + V * C
    return 6 * params + 12 * L * T * C


# ----- workers: one measurement each, in a fresh process --------------------------------------------

def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_peak_above(base):
    """The process's peak resident set, in bytes above ``base``."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base


def median_seconds(run, sync, repeats):
    """The median time of ``repeats`` calls of ``run``: one sampling run is under a second, short
    enough for a slow spell of a shared machine to halve it."""
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timed_steps(step, sync, steps):
    """Seconds for ``steps`` calls of ``step`` after one untimed warm-up call."""
    step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return time.perf_counter() - t0


def our_model(cfg_name, device):
    """Our GPT of a config (seed 0), on ``device``."""
    from minirlhf.model import GPT, GPTConfig

    L, C, H, T, B, V = CONFIGS[cfg_name]
    config = GPTConfig(block_size=T, vocab_size=V, n_layer=L, n_head=H, n_embd=C)
    return GPT(config, seed=0).to(device)


def our_training(cfg_name, device):
    """Our GPT of a config, its AdamW and one fixed batch of inputs and targets x, y (B, T)."""
    import numpy as np

    from minirlhf.optim import AdamW, param_groups
    from minirlhf.tensor import Tensor

    L, C, H, T, B, V = CONFIGS[cfg_name]
    model = our_model(cfg_name, device)
    optimizer = AdamW(param_groups(model, 0.1), lr=1e-4)
    rng = np.random.default_rng(0)
    x = Tensor(rng.integers(0, V, (B, T))).to(device)
    y = Tensor(rng.integers(0, V, (B, T))).to(device)
    return model, optimizer, x, y


def worker_ours(cfg_name, what, device, steps, repeats=SAMPLE_REPEATS):
    import numpy as np

    import minirlhf.functional as F
    from minirlhf.model import generate

    L, C, H, T, B, V = CONFIGS[cfg_name]
    if what == "train":
        model, optimizer, x, y = our_training(cfg_name, device)
        sync = _sync(device)

        def step():
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            return loss

        base = rss_bytes()
        if device == "cuda":
            import cupy
            pool = cupy.get_default_memory_pool()
            base = pool.used_bytes()
        seconds = timed_steps(step, sync, steps)
        peak = pool.total_bytes() - base if device == "cuda" else cpu_peak_above(base)
        return {"tokens_per_s": steps * B * T / seconds, "peak_mb": peak / 2**20}
    model = our_model(cfg_name, device)
    prompts = np.random.default_rng(0).integers(0, V, (SAMPLE_PROMPTS, SAMPLE_PROMPT_LEN)).tolist()
    use_cache = what == "sample"
    generate(model, prompts, 4, temperature=1.0, seed=0, use_cache=use_cache)
    repeats = repeats if use_cache else 1             # without the cache one run takes seconds
    seconds = median_seconds(lambda: generate(model, prompts, new_tokens(T), temperature=1.0,
                                              seed=0, use_cache=use_cache), _sync(device), repeats)
    return {"tokens_per_s": SAMPLE_PROMPTS * new_tokens(T) / seconds}


def _sync(device):
    if device == "cuda":
        import cupy
        return cupy.cuda.Device().synchronize
    return lambda: None


def worker_torch(cfg_name, what, device, steps, repeats=SAMPLE_REPEATS, attention="sdpa"):
    """The same GPT in PyTorch eager. ``attention``: "sdpa", `F.scaled_dot_product_attention`
    (is_causal for a prompt, no mask for one new query, which sees every cached key), as PyTorch
    users write it today; or "manual", the softmax(q kᵀ/√hs + mask) v written out, as nanoGPT's
    slow path and our plain reference do. The KV cache grows by torch.cat, as Hugging Face's
    DynamicCache does."""
    import torch
    import torch.nn as nn
    from torch.nn import functional as TF

    L, C, H, T, B, V = CONFIGS[cfg_name]
    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", THREADS)))

    def attend(q, k, v):                                              # (B, nh, T, hs)
        Tq, Tk = q.shape[2], k.shape[2]
        if attention == "sdpa":
            return TF.scaled_dot_product_attention(q, k, v, is_causal=Tq > 1)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(C // H)
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
        return att.masked_fill(~mask, float("-inf")).softmax(-1) @ v

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
            self.c_attn, self.c_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
            self.c_fc, self.mlp_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

        def forward(self, x, cache=None):
            B_, T_, _ = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
            q, k, v = (t.view(B_, T_, H, C // H).transpose(1, 2) for t in (q, k, v))
            if cache is not None:
                if cache:
                    k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
                cache[:] = [k, v]
            y = attend(q, k, v).transpose(1, 2).reshape(B_, T_, C)
            x = x + self.c_proj(y)
            return x + self.mlp_proj(TF.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(T, C)
            self.h = nn.ModuleList(Block() for _ in range(L))
            self.ln_f = nn.LayerNorm(C)

        def forward(self, idx, caches=None, start=0):
            pos = torch.arange(start, start + idx.shape[1], device=idx.device)
            x = self.wte(idx) + self.wpe(pos)
            for i, block in enumerate(self.h):
                x = block(x, None if caches is None else caches[i])
            return self.ln_f(x) @ self.wte.weight.T

    model = GPT().to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if what == "train":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
        x = torch.randint(0, V, (B, T), device=device)
        y = torch.randint(0, V, (B, T), device=device)

        def step():
            loss = TF.cross_entropy(model(x).view(-1, V), y.view(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        base = rss_bytes() if device == "cpu" else torch.cuda.memory_allocated()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = timed_steps(step, sync, steps)
        peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else cpu_peak_above(base)
        return {"tokens_per_s": steps * B * T / seconds, "peak_mb": peak / 2**20}

    model.eval()
    prompts = torch.randint(0, V, (SAMPLE_PROMPTS, SAMPLE_PROMPT_LEN), device=device)

    @torch.no_grad()
    def sample(n):
        caches = [[] for _ in range(L)]
        logits = model(prompts, caches)
        pos = prompts.shape[1]
        for _ in range(n):
            probs = logits[:, -1].softmax(-1)
            tok = torch.multinomial(probs, 1)
            logits = model(tok, caches, start=pos)
            pos += 1

    sample(4)
    seconds = median_seconds(lambda: sample(new_tokens(T)), sync, repeats)
    return {"tokens_per_s": SAMPLE_PROMPTS * new_tokens(T) / seconds}


def worker_matmul(device):
    """float32 GEMM throughput of the array library: the peak our training is measured against."""
    import numpy as np
    n = 2048 if device == "cpu" else 8192
    if device == "cuda":
        import cupy as xp
    else:
        xp = np
    a = xp.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    b = a.copy()
    sync = _sync(device)
    a @ b
    sync()
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return {"gflops": 2 * n ** 3 / best / 1e9}


# ----- the driver: alternate processes, collect, print ------------------------------------------------

THREADS = 2


def run_worker(args_list, timeout, tree=None):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", *args_list]
    n = str(THREADS)
    env = {**os.environ, "OMP_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "MKL_NUM_THREADS": n,
           "MINIRLHF_NUM_THREADS": n}
    if tree:
        env["MINIRLHF_TREE"] = tree
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def torch_available():
    return subprocess.run([sys.executable, "-c", "import torch"], capture_output=True).returncode == 0


def median_of(results, key):
    values = [r[key] for r in results if key in r]
    return statistics.median(values) if values else float("nan")


def paired_ratios(ours, theirs, key):
    """ours / theirs of each round: the two ran back to back, so a slow spell of a shared machine
    moves both. Falls back to one ratio of medians when a round failed on either side."""
    if len(ours) == len(theirs) and ours:
        return [a[key] / b[key] for a, b in zip(ours, theirs)]
    return [median_of(ours, key) / median_of(theirs, key)]


ANCHOR_NAMES = {"sdpa": "PyTorch SDPA", "manual": "PyTorch hand-written attention"}


def main():
    global THREADS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["tiny", "small", "medium"], choices=list(CONFIGS))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--anchor", "--anchors", dest="anchors", nargs="+", default=["sdpa", "manual"],
                   choices=list(ANCHOR_NAMES),
                   help="the PyTorch models measured against (default: both); sampling is "
                        "measured against the first")
    p.add_argument("--threads", type=int, default=THREADS, help="threads of every process")
    p.add_argument("--rounds", type=int, default=4, help="A B rounds per measurement (median taken)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (default per config)")
    p.add_argument("--sample-repeats", type=int, default=SAMPLE_REPEATS,
                   help="timed sampling runs per process (median taken)")
    p.add_argument("--nocache", action="store_true",
                   help="also time our sampling without the KV cache (first round only; slow)")
    p.add_argument("--no-torch", action="store_true", help="only our numbers")
    p.add_argument("--timeout", type=int, default=600)
    p.add_argument("--base-tree", default=None,
                   help="a folder holding another minirlhf package, measured in the same rounds")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        kind, *rest = args.worker
        if kind == "matmul":
            result = worker_matmul(rest[0])
        else:
            cfg_name, what, device, steps, repeats = rest
            if kind == "ours":
                result = worker_ours(cfg_name, what, device, int(steps), int(repeats))
            else:                                     # torch-sdpa, torch-manual
                result = worker_torch(cfg_name, what, device, int(steps), int(repeats),
                                      attention=kind.split("-")[1])
        print(json.dumps(result))
        return

    THREADS = args.threads
    anchors = [] if args.no_torch or not torch_available() else list(dict.fromkeys(args.anchors))
    trees = {"ours": None}
    if args.base_tree:
        trees["base"] = os.path.abspath(args.base_tree)
    mine = list(trees)                                # "ours" and maybe "base"
    frameworks = mine + [f"torch-{a}" for a in anchors]
    peak = statistics.median(run_worker(["matmul", args.device], args.timeout)["gflops"]
                             for _ in range(3))
    print(f"device {args.device} ({os.cpu_count()} CPUs, {THREADS} threads a process); float32 matmul peak "
          f"{peak:.1f} GFLOP/s; anchors: {', '.join(ANCHOR_NAMES[a] for a in anchors) or 'none'}; "
          f"{args.rounds} rounds, each side in its own process, alternating\n")

    whats = ["train", "sample"] + (["sample_nocache"] if args.nocache else [])
    rows = []
    for name in args.configs:
        steps = args.steps or STEPS[args.device][name]
        results = {(fw, what): [] for fw in frameworks for what in whats}
        for round_number in range(args.rounds):
            for what in whats:
                for fw in frameworks:
                    if what == "sample_nocache" and (fw not in mine or round_number > 0):
                        continue                # ours only, first round only: it takes long
                    if what == "sample" and fw.startswith("torch") and fw != frameworks[len(mine)]:
                        continue                # sampling: against the first anchor only
                    kind = "ours" if fw in mine else fw
                    r = run_worker([kind, name, what, args.device, str(steps), str(args.sample_repeats)],
                                   args.timeout, tree=trees.get(fw))
                    if "error" in r:
                        print(f"  {fw} {name} {what}: {r['error']}", file=sys.stderr)
                    else:
                        results[(fw, what)].append(r)
        for fw in mine:
            rows.append(table_row(name, fw, results, anchors, peak))
        print_table(rows, anchors, args.nocache)
        print()
    print_rounds(rows, anchors)


def table_row(name, fw, results, anchors, peak):
    """One config's numbers for ``fw`` ("ours" or "base"), the anchors', and the ratios."""
    L, C, H, T, B, V = CONFIGS[name]
    train = median_of(results[(fw, "train")], "tokens_per_s")
    row = {"config": name, "tree": fw, "train": train,
           "peak_mb": median_of(results[(fw, "train")], "peak_mb"),
           "sample": median_of(results[(fw, "sample")], "tokens_per_s"),
           "sample_nocache": median_of(results.get((fw, "sample_nocache"), []), "tokens_per_s"),
           "matmul_share": train * flops_per_token(L, C, T, V) / (peak * 1e9), "anchors": {}}
    for i, a in enumerate(anchors):
        theirs = f"torch-{a}"
        row["anchors"][a] = {
            "train": median_of(results[(theirs, "train")], "tokens_per_s"),
            "peak_mb": median_of(results[(theirs, "train")], "peak_mb"),
            "train_ratios": paired_ratios(results[(fw, "train")], results[(theirs, "train")],
                                          "tokens_per_s")}
        if i == 0:
            row["anchors"][a].update(
                sample=median_of(results[(theirs, "sample")], "tokens_per_s"),
                sample_ratios=paired_ratios(results[(fw, "sample")], results[(theirs, "sample")],
                                            "tokens_per_s"))
    return row


def print_table(rows, anchors, nocache):
    cols = ["config", "tree", "train tok/s"]
    for a in anchors:
        cols += [f"train tok/s ({a})", f"train ratio to {a}"]
    cols += ["sample tok/s (cache)"]
    if anchors:
        cols += [f"sample tok/s ({anchors[0]})", f"sample ratio to {anchors[0]}"]
    if nocache:
        cols += ["sample tok/s (no cache)"]
    cols += ["peak MB"] + [f"peak MB ({a})" for a in anchors]
    cols += [f"memory ratio to {a}" for a in anchors] + ["share of matmul peak"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = [r["config"], r["tree"], f"{r['train']:,.0f}"]
        for a in anchors:
            cells += [f"{r['anchors'][a]['train']:,.0f}", ratio_cell(r["anchors"][a]["train_ratios"])]
        cells += [f"{r['sample']:,.0f}"]
        if anchors:
            first = r["anchors"][anchors[0]]
            cells += [f"{first['sample']:,.0f}", ratio_cell(first["sample_ratios"])]
        if nocache:
            cells += [f"{r['sample_nocache']:,.0f}"]
        cells += [f"{r['peak_mb']:,.0f}"] + [f"{r['anchors'][a]['peak_mb']:,.0f}" for a in anchors]
        cells += [f"{r['peak_mb'] / max(r['anchors'][a]['peak_mb'], 1e-9):.2f}" for a in anchors]
        cells += [f"{r['matmul_share']:.2f}"]
        print("| " + " | ".join(cells) + " |")
    if anchors:
        print("\nratios: the median over rounds of ours / PyTorch measured back to back "
              "(lowest–highest round in brackets); memory: peak RSS of training above the "
              "process's RSS before its first step")


def print_rounds(rows, anchors):
    """Every round's ratio, as the issue asks."""
    if not anchors:
        return
    print("every round (ours / PyTorch, in the order run):")
    for r in rows:
        for i, a in enumerate(anchors):
            parts = [f"train/{a} " + " ".join(f"{x:.2f}" for x in r["anchors"][a]["train_ratios"])]
            if i == 0:
                parts.append(f"sample/{a} " + " ".join(f"{x:.2f}" for x in
                                                        r["anchors"][a]["sample_ratios"]))
            print(f"  {r['config']} {r['tree']}: " + "; ".join(parts))


def ratio_cell(ratios):
    if len(ratios) == 1:
        return f"{ratios[0]:.2f}"
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})"


if __name__ == "__main__":
    main()
