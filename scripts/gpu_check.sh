#!/usr/bin/env bash
# One pass of the checks that need a CUDA GPU, in under 8 minutes on one GPU, ending in one
# summary table. Run from the repository root on any CUDA box after scripts/setup.sh:
#     bash scripts/gpu_check.sh
# Written without a GPU at hand (issue 12): it has not run yet. Time limits add up to 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-benchmarks/out/gpu_check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || { echo "no GPU: nothing to check"; exit 1; }
declare -A STATUS
run() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then STATUS[$name]="ok"; else STATUS[$name]="FAILED ($?)"; fi
  STATUS[$name]+=" in $((SECONDS - start)) s, log $OUT/$name.log"
}
run pytest_gpu 150 "$PY" -m pytest -q -m gpu tests
run launches 60 "$PY" benchmarks/launches.py --json "$OUT/launches.json"
run kernel_speed 120 "$PY" benchmarks/kernel_speed.py --json "$OUT/kernel_speed.json"
# CUDA-graph capture on a gpt-oss-20b-shaped random checkpoint (2 layers), eager vs graph decode tok/s
run graph_decode 150 "$PY" benchmarks/graph_decode.py --preset gpt-oss-20b --layers 2 --batch 1 64 \
    --json "$OUT/graph_decode.json"
echo
echo "| check | result |"
echo "|---|---|"
for name in pytest_gpu launches kernel_speed graph_decode; do echo "| $name | ${STATUS[$name]} |"; done
echo
tail -n 3 "$OUT/pytest_gpu.log"
sed -n '1,6p' "$OUT/launches.log"
tail -n 15 "$OUT/kernel_speed.log"
tail -n 7 "$OUT/graph_decode.log"
