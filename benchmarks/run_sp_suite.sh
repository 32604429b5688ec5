#!/usr/bin/env bash
# The sequence-parallel and training benchmarks of the README, in one go on a multi-GPU host.
# Usage: benchmarks/run_sp_suite.sh OUT_DIR [SP]   (SP defaults to every GPU)
# 1. bench_sp: one layer at 64K, 256K and 1M tokens (LASP-2, LASP-1, linear over all-gathered
#    K and V; softmax all-gather and Ring at 64K), the gather split 1/4/16/64 at 256K, overlap.
# 2. bench_train, Linear-Llama3-1B: weak scaling at 16K tokens per GPU (SP = 1, 2, SP), the
#    same with the 'dots' remat policy at SP, then longer sequences at SP up to 2M tokens
#    (2M with fsdp over the sp ranks: without it the step needs 85.6 GB per GPU), and the
#    1/4 hybrid.
set -uo pipefail
out=${1:?output folder}
sp=${2:-$(python3 -c "import jax; print(jax.device_count())")}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
timeout 200 python3 benchmarks/bench_sp.py --sp "$sp" --budget-s 130 --split-at 262144 \
  --out "$out" 2>&1 \
  | grep -v Warning | tee "$out/bench_sp.log"
w=$((16384 * sp))
timeout 380 python3 benchmarks/bench_train.py --sp "$sp" --budget-s 330 --out "$out" --steps 3 \
  --cases "pure:1:16384,pure:$((sp / 2)):$((w / 2)),pure:$sp:$w,pure:$sp:$w:dots,pure:$sp:262144,pure:$sp:1048576,pure:$sp:2097152:fsdp,hybrid:$sp:$w" \
  2>&1 | grep -v Warning | tee "$out/bench_train.log"
