#!/usr/bin/env bash
# Every GPU figure in one call (for the device machine: a few minutes on one H100/H200).
# Usage: bash bench/gpu.sh   -> bench/results/models-{coinrun,tiny}-cuda.json, bench/results/cuda/serving-*.json
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python bench/bench_models.py --preset coinrun --device cuda --repeats 5 --out bench/results/models-coinrun-cuda.json
python bench/bench_models.py --preset tiny --device cuda --repeats 5 --out bench/results/models-tiny-cuda.json
python bench/bench_serving.py --backend inprocess --preset coinrun --device cuda --out-dir bench/results/cuda
