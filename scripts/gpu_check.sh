#!/usr/bin/env bash
# The prepared CUDA checks of issues #4 and #6 (benchmarks/gpu_check.py), for a lent GPU machine
# that has torch but no network: the missing packages come as wheels in .whl/, a Fashion-MNIST
# train and test shard in .gpudata/fmnist/ (see benchmarks/README.md, "GPU check").
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
out="${OUT:-runs/gpu_check}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 benchmarks/gpu_check.py --data .gpudata/fmnist --out "$out" 2>&1 | tee "$out/gpu_check.log"
