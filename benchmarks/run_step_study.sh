#!/usr/bin/env bash
# Where the Linear-Llama3-1B training step spends its time at SP = 1 and SP > 1, and what
# communication settings and remat policies change, in one go on a multi-GPU host.
# Usage: benchmarks/run_step_study.sh OUT_DIR [SP]   (SP defaults to every GPU)
# 1. profile_train at 16K tokens per GPU, SP = 1 and SP (trace summary by category, exposed
#    collective time, the collectives of the compiled step).
# 2. bench_train, weak scaling at 16K tokens per GPU (SP = 1 and SP) under each setting:
#    the defaults; NCCL's Simple protocol; XLA's all-reduce combiner capped at 128 MB (so the
#    output layer's gradient reduction need not wait for the embedding's); remat dots / none.
set -uo pipefail
out=${1:?output folder}
sp=${2:-$(python3 -c "import jax; print(jax.device_count())")}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
w=$((16384 * sp))
for case in "pure:1:16384" "pure:$sp:$w"; do
  timeout 75 python3 benchmarks/profile_train.py --case "$case" --out "$out" 2>&1 \
    | grep -v Warning | tail -22 | tee -a "$out/profile.log"
done
train() {  # name, cases, then env assignments
  local name=$1 cases=$2
  shift 2
  env "$@" timeout 110 python3 benchmarks/bench_train.py --out "$out/$name" --steps 5 \
    --cases "$cases" 2>&1 | grep -v Warning | tail -3 | sed "s/^/$name: /" \
    | tee -a "$out/bench_train.log"
}
train default "pure:1:16384,pure:$sp:$w"
train nccl_simple "pure:$sp:$w" NCCL_PROTO=Simple
train combine_128mb "pure:$sp:$w" XLA_FLAGS=--xla_gpu_all_reduce_combine_threshold_bytes=134217728
train remat_dots "pure:1:16384:dots,pure:$sp:$w:dots"
train remat_none "pure:1:16384:none,pure:$sp:$w:none"
