#!/usr/bin/env bash
# The GPU check, run in one call on a machine with a CUDA GPU and CuPy installed:
#   1. the whole test suite with the device-aware tests on the CuPy backend;
#   2. the GPU benchmark (ours against PyTorch eager on the same GPU, when PyTorch is installed);
#   3. where a training step's time goes (benchmarks/bench_step_parts.py).
#   4. optionally, step 3 for an older tree on the same machine (BASE_TREE, below).
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
