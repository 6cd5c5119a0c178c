#!/usr/bin/env bash
# The GPU check, run in one call on a machine with a CUDA GPU and CuPy installed:
#   1. the whole test suite with the device-aware tests on the CuPy backend;
#   2. the GPU benchmark (ours against PyTorch eager on the same GPU, when PyTorch is installed);
#   3. where a training step's time goes (benchmarks/bench_step_parts.py).
#   4. optionally, step 3 for an older tree on the same machine (BASE_TREE, below);
#   5. a few DPO steps on a GPT-2-small-shaped model (124M, random weights) through a Hugging Face
#      folder (save_gpt2 -> load_gpt2, when safetensors is installed), reporting tokens/s.
#      Alone, and on the CPU with a tiny shape (how it is tested without a GPU):
#        GPU_CHECK_ONLY=dpo DPO_DEVICE=cpu DPO_SHAPE=tiny bash scripts/gpu_check.sh
# Results land in $OUT (or ./gpu_out) so the device tool brings them back.
#
# The GPU machine reaches no package index. If pytest, hypothesis or tqdm are missing there, download
# their wheels here first and carry the folder:  pip download -d .gpu_wheels pytest hypothesis tqdm
# PYTHON picks the interpreter (default python3, the one that holds CuPy and PyTorch on the lent machine).
set -uo pipefail
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# DPO steps: B pairs of T tokens (the first eighth is the prompt), the policy and the frozen reference both GPT-2 small
dpo_steps() {
    DPO_SHAPE=${DPO_SHAPE:-gpt2} DPO_DEVICE=${DPO_DEVICE:-cuda} timeout 240 $PY - <<'PYEOF'
import os, tempfile, time
import numpy as np
from minirlhf import backend
from minirlhf.losses import dpo_loss
from minirlhf.model import GPT, GPTConfig
from minirlhf.optim import AdamW, clip_grad_norm_, param_groups
from minirlhf.tensor import no_grad
from minirlhf.train.dpo import pair_logps

device = os.environ["DPO_DEVICE"]
shapes = {"gpt2": (dict(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768), 4, 512, 5),
          "tiny": (dict(block_size=64, vocab_size=300, n_layer=2, n_head=2, n_embd=32), 2, 32, 2)}
shape, B, T, steps = shapes[os.environ["DPO_SHAPE"]]
model = GPT(GPTConfig(**shape), seed=0)
n_params = sum(p.data.size for p in model.parameters())
try:                       # the way a user's GPT-2 arrives: a Hugging Face folder
    from minirlhf.hf import load_gpt2, save_gpt2
    folder = tempfile.mkdtemp()
    t = time.perf_counter()
    save_gpt2(model, folder)
    policy, _ = load_gpt2(folder, device=device)
    ref, _ = load_gpt2(folder, device=device)
    print(f"save_gpt2 + 2 x load_gpt2 of {n_params:,} parameters: {time.perf_counter() - t:.1f} s")
except ImportError:
    policy, ref = model.to(device), GPT(GPTConfig(**shape), seed=0).to(device)
    print("no safetensors here: the models are built directly")
rng = np.random.default_rng(0)
def pair():
    ids = rng.integers(0, shape["vocab_size"], (2, T)).tolist()
    return (ids[0], T // 8), (ids[1], T // 8)  # (row, n_prompt)
optimizer = AdamW(param_groups(policy, 0.0), lr=1e-5)
sync = (lambda: __import__("cupy").cuda.Device().synchronize()) if device == "cuda" else (lambda: None)
times = []
for step in range(steps + 2):                  # two warm-up steps, not timed
    pairs = [pair() for _ in range(B)]
    sync()
    t = time.perf_counter()
    with no_grad():
        ref_c, ref_r = pair_logps(ref, pairs, device)
    pi_c, pi_r = pair_logps(policy, pairs, device)
    loss, metrics = dpo_loss(pi_c, pi_r, ref_c.data, ref_r.data, beta=0.1)
    optimizer.zero_grad()
    loss.backward()
    clip_grad_norm_(policy.parameters(), 1.0)
    optimizer.step()
    sync()
    times.append(time.perf_counter() - t)
    print(f"step {step}: loss {loss.item():.4f} ({times[-1]:.3f} s)")
seconds = float(np.median(times[2:]))
print(f"DPO on {n_params:,} parameters, {device}: {B} pairs x {T} tokens a step, median "
      f"{seconds:.3f} s/step = {2 * B * T / seconds:,.0f} tokens/s (policy forward+backward, "
      f"reference forward, AdamW)")
PYEOF
}
if [[ "${GPU_CHECK_ONLY:-}" == dpo ]]; then
    dpo_steps 2>&1 | tee "$out/dpo_gpt2.txt"
    exit "${PIPESTATUS[0]}"
fi
if [[ -d .gpu_wheels ]]; then
    $PY -m pip install --quiet --no-index --find-links .gpu_wheels pytest hypothesis tqdm 2>&1 | tail -n 2
fi
$PY -c "import pytest, hypothesis, tqdm" || {
    echo "pytest, hypothesis and tqdm are needed: carry .gpu_wheels (see the top of this script)"; exit 2; }
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
$PY -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__)" | tee -a "$out/gpu.txt"

# every failure is listed (no -x): a lent GPU is rare, one run should show all there is to fix
MINIRLHF_TEST_DEVICE=cuda CI=true timeout 130 $PY -m pytest -q -p no:cacheprovider --maxfail=40 2>&1 \
    | tee "$out/tests_cuda.txt" | grep -E "FAILED|ERROR|passed|failed" | tail -n 45

# medium is bound by Python's launches, and the lent machine's host speed drifts: 3 rounds; gpt2, 1
timeout 130 $PY benchmarks/bench_gpt.py --device cuda --configs medium --rounds 3 --sample-repeats 2 2>&1 \
    | tee "$out/bench_gpu.txt" | tail -n 6
timeout 100 $PY benchmarks/bench_gpt.py --device cuda --configs gpt2 --rounds 1 --sample-repeats 2 2>&1 \
    | tee -a "$out/bench_gpu.txt" | tail -n 6

# where a step's time goes (host: Python enqueuing kernels; total: until the GPU is done)
timeout 45 $PY benchmarks/bench_step_parts.py --device cuda --configs medium gpt2 2>&1 \
    | tee "$out/step_parts_gpu.txt" | tail -n 12

# a before/after of a change on one machine (each call of the device tool may get another machine):
# BASE_TREE names an older checkout carried along, e.g.  git archive REV | tar -x -C .gpu_probe/base
if [[ -n "${BASE_TREE:-}" ]]; then
    (cd "$BASE_TREE" && timeout 30 $PY benchmarks/bench_step_parts.py --device cuda --configs medium) \
        2>&1 | tee "$out/step_parts_base.txt" | tail -n 5
fi

# a GPT-2-small-shaped model through a Hugging Face folder, a few DPO steps: tokens/s
dpo_steps 2>&1 | tee "$out/dpo_gpt2.txt" | tail -n 4
