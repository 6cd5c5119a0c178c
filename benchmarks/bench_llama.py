"""A Llama-style model of SmolLM-135M's shapes: training step speed and peak memory, ours against
transformers' LlamaForCausalLM on the same shapes, side by side.

    python benchmarks/bench_llama.py                       # B=1, T=128, 2 timed steps, 1 round
    python benchmarks/bench_llama.py --batch 4 --seq 256 --steps 3 --rounds 2

SmolLM-135M: 30 layers, 576 wide, 9 heads sharing 3 key/value heads, SwiGLU of width 1536, vocab
49,152, embeddings tied to the head; random weights, float32. A training step is a forward pass,
the cross-entropy of next tokens, backward and an AdamW step. Each measurement runs in its own
process (ours and PyTorch alternating): their BLAS thread pools in one process slow each other
down, and only ratios measured in one run mean anything on a shared machine. Peak memory is the
process's peak resident set (weights, AdamW's moments, activations) above what it held after
its imports.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_gpt import cpu_peak_above as peak_above, rss_bytes  # noqa: E402  (benchmarks/ is on the path)

SMOLLM = dict(n_layer=30, n_embd=576, n_head=9, n_kv_head=3, n_inner=1536, vocab_size=49152,
              block_size=2048, rope_theta=10000.0, rms_norm_eps=1e-5)


def ours(batch, seq, steps):
    import numpy as np

    import minirlhf.functional as F
    from minirlhf.model import GPT, GPTConfig
    from minirlhf.optim import AdamW, param_groups

    base = rss_bytes()
    model = GPT(GPTConfig(**SMOLLM, norm="rms", pos="rope", mlp="swiglu", bias=False), seed=0)
    optimizer = AdamW(param_groups(model, 0.1), lr=1e-4)
    ids = np.random.default_rng(0).integers(0, SMOLLM["vocab_size"], (batch, seq + 1))

    def step():
        logits = model(ids[:, :-1])                                   # (B, T, V)
        loss = F.cross_entropy(logits, ids[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    return timed(step, steps, batch * seq, base, model.num_parameters())


def torch_side(batch, seq, steps):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    base = rss_bytes()
    s = SMOLLM
    config = LlamaConfig(vocab_size=s["vocab_size"], hidden_size=s["n_embd"], intermediate_size=s["n_inner"],
                         num_hidden_layers=s["n_layer"], num_attention_heads=s["n_head"],
                         num_key_value_heads=s["n_kv_head"], max_position_embeddings=s["block_size"],
                         rms_norm_eps=s["rms_norm_eps"], rope_theta=s["rope_theta"],
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    ids = torch.randint(0, s["vocab_size"], (batch, seq + 1))

    def step():
        logits = model(ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    return timed(step, steps, batch * seq, base, sum(p.numel() for p in model.parameters()))


def timed(step, steps, tokens, base, params):
    step()                                                            # warm-up: allocations, tables
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    seconds = (time.perf_counter() - start) / steps
    return {"tokens_per_s": tokens / seconds, "step_s": seconds, "peak_mb": peak_above(base) / 2**20,
            "params": params, "loss": loss}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=1, help="processes per side, alternating")
    parser.add_argument("--worker", choices=["ours", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        fn = ours if args.worker == "ours" else torch_side
        print(json.dumps(fn(args.batch, args.seq, args.steps)))
        return

    results = {"ours": [], "torch": []}
    for _ in range(args.rounds):
        for side in results:
            cmd = [sys.executable, __file__, "--worker", side, "--batch", str(args.batch),
                   "--seq", str(args.seq), "--steps", str(args.steps)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                print(f"{side}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            results[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = {side: max(r, key=lambda x: x["tokens_per_s"]) for side, r in results.items() if r}
    print(f"SmolLM-135M shapes, float32, B={args.batch}, T={args.seq}, {args.steps} timed steps, "
          f"best of {args.rounds} round(s)")
    print(f"{'':8} {'params':>12} {'tokens/s':>10} {'step s':>8} {'peak MB':>9}")
    for side, r in best.items():
        print(f"{side:8} {r['params']:>12,} {r['tokens_per_s']:>10.1f} {r['step_s']:>8.2f} {r['peak_mb']:>9.0f}")
    if len(best) == 2:
        o, t = best["ours"], best["torch"]
        print(f"{'ratio':8} {'':>12} {o['tokens_per_s'] / t['tokens_per_s']:>10.2f} "
              f"{o['step_s'] / t['step_s']:>8.2f} {o['peak_mb'] / t['peak_mb']:>9.2f}   (ours / PyTorch)")


if __name__ == "__main__":
    main()
