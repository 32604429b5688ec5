#!/usr/bin/env bash
# The sequence-parallel and training benchmarks of the README, in one go on a multi-GPU host.
# Usage: benchmarks/run_sp_suite.sh OUT_DIR [SP]   (SP defaults to every GPU)
set -uo pipefail
out=${1:?output folder}
sp=${2:-$(python3 -c "import jax; print(jax.device_count())")}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
timeout 270 python3 benchmarks/bench_sp.py --sp "$sp" --budget-s 150 --out "$out" 2>&1 \
  | tee "$out/bench_sp.log"
timeout 290 python3 benchmarks/bench_train.py --sp "$sp" --budget-s 200 --out "$out" --steps 2 \
  --cases "pure:1:16384,pure:2:32768,pure:$sp:$((16384 * sp)),hybrid:$sp:$((16384 * sp)),pure:$sp:1048576,pure:$sp:2097152" \
  2>&1 | tee "$out/bench_train.log"
