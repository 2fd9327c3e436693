#!/usr/bin/env bash
# Every GPU figure in one call (for the device machine: a few minutes on one H100/H200).
# Usage: bash bench/gpu.sh [RESULTS_DIR]   (with the project installed: `make venv`, or pip install --no-deps .)
#   -> RESULTS_DIR/models-{coinrun,tiny}-cuda.json, RESULTS_DIR/serving-*.json, RESULTS_DIR/gpu.log
# RESULTS_DIR defaults to $OUT (the device tool's folder) or bench/results/cuda. Each part has its own time
# limit and a failed part does not stop the next, so one call always brings back what did run.
set -uo pipefail
cd "$(dirname "$0")/.."
results=${1:-${OUT:-bench/results/cuda}}
mkdir -p "$results"
export PYTHONPATH="$PWD:$PWD/protos${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec > >(tee -a "$results/gpu.log") 2>&1

part() {  # part SECONDS NAME COMMAND...: run one measurement, report how it ended
    local limit=$1 name=$2 started=$SECONDS
    shift 2
    echo "== $name"
    timeout --kill-after=10 "$limit" "$@"
    echo "== $name: exit $? after $((SECONDS - started)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
part 120 "models tiny" python bench/bench_models.py --preset tiny --device cuda --repeats 5 \
    --out "$results/models-tiny-cuda.json"
part 240 "models coinrun" python bench/bench_models.py --preset coinrun --device cuda --repeats 5 \
    --out "$results/models-coinrun-cuda.json"
part 180 "serving coinrun (inprocess)" python bench/bench_serving.py --backend inprocess --preset coinrun \
    --device cuda --out-dir "$results"
part 90 "profile coinrun step, 1 world" python bench/profile_step.py --preset coinrun --worlds 1
part 90 "profile coinrun step, 32 worlds" python bench/profile_step.py --preset coinrun --worlds 32 --rows 15
nvidia-smi --query-gpu=memory.used,temperature.gpu,clocks.sm --format=csv,noheader
