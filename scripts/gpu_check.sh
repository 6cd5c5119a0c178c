#!/usr/bin/env bash
# The GPU check, run in one call on a machine with a CUDA GPU and CuPy installed:
#   1. the whole test suite with the device-aware tests on the CuPy backend;
#   2. the GPU benchmark (ours against PyTorch eager on the same GPU, when PyTorch is installed).
# Results land in $OUT (or ./gpu_out) so the device tool brings them back.
#
# The GPU machine reaches no package index. If pytest, hypothesis or tqdm are missing there, download
# their wheels here first and carry the folder:  pip download -d .gpu_wheels pytest hypothesis tqdm
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ -d .gpu_wheels ]]; then
    python -m pip install --quiet --no-index --find-links .gpu_wheels pytest hypothesis tqdm 2>&1 | tail -n 2
fi
python -c "import pytest, hypothesis, tqdm" || {
    echo "pytest, hypothesis and tqdm are needed: carry .gpu_wheels (see the top of this script)"; exit 2; }
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
python -c "import cupy; print('cupy', cupy.__version__)" | tee -a "$out/gpu.txt"

MINIRLHF_TEST_DEVICE=cuda CI=true timeout 300 python -m pytest -q -x -p no:cacheprovider 2>&1 \
    | tee "$out/tests_cuda.txt" | tail -n 25

timeout 240 python benchmarks/bench_gpt.py --device cuda --configs medium gpt2 --rounds 1 2>&1 \
    | tee "$out/bench_gpu.txt" | tail -n 30
