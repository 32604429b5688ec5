#!/usr/bin/env bash
# Where the SP > 1 training step loses time, and whether bf16 gradient reduction and the
# flash-attention softmax backend win it back, in one go on a multi-GPU host.
# Usage: benchmarks/run_grad_reduce_study.sh OUT_DIR [SP]   (SP defaults to every GPU)
# 1. The flash-attention kernels against the float64 oracle on the GPU (pytest -m gpu).
# 2. bench_sp at 64K: softmax all-gather attention, blockwise XLA against the Pallas kernels.
# 3. profile_train: one SP step with f32 and with bf16 gradient reduction (trace summary and
#    the collective bytes of the compiled step).
# 4. bench_train: weak scaling at 16K tokens per GPU (SP = 1 and SP), f32 and bf16 gradient
#    reduction, and the 1/4 hybrid at SP with the Pallas softmax.
set -uo pipefail
out=${1:?output folder}
sp=${2:-$(python3 -c "import jax; print(jax.device_count())")}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
w=$((16384 * sp))
JAX_PLATFORMS=cuda timeout 80 python3 -m pytest -q -m gpu tests/test_softmax_attention.py \
  2>&1 | tail -5 | tee "$out/gpu_tests.log"
timeout 70 python3 benchmarks/bench_sp.py --sp "$sp" --lengths 65536 --budget-s 50 \
  --methods softmax_allgather,softmax_allgather_pallas --out "$out" 2>&1 | grep -v Warning \
  | tail -8 | tee "$out/bench_sp.log"
for grad in "" ":bf16grad"; do
  timeout 75 python3 benchmarks/profile_train.py --case "pure:$sp:$w$grad" --out "$out" 2>&1 \
    | grep -v Warning | tail -22 | tee -a "$out/profile.log"
done
timeout 240 python3 benchmarks/bench_train.py --sp "$sp" --budget-s 200 --out "$out" --steps 5 \
  --cases "pure:1:16384,pure:$sp:$w,pure:1:16384:bf16grad,pure:$sp:$w:bf16grad" \
  2>&1 | grep -v Warning | tail -7 | tee "$out/bench_train.log"
timeout 80 python3 benchmarks/bench_train.py --sp "$sp" --out "$out/hybrid" --steps 3 \
  --cases "hybrid:$sp:$w" --softmax-backend pallas 2>&1 | grep -v Warning | tail -4
