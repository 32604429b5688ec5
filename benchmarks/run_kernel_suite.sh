#!/usr/bin/env bash
# The kernel measurements of the README (issue: Pallas kernels) in one go on one GPU.
# Usage: benchmarks/run_kernel_suite.sh OUT_DIR
# 1. GPU correctness against the float64 oracle (quick set: resets, bf16 for the decays);
# 2. forward and forward+backward medians at B=1 T=16K (pallas, FLA, xla), then B=4 T=16K and
#    B=1 T=64K (pallas, FLA). Each step writes its own JSON; a step cut short keeps its rows.
# 3. the opt-in crossing-pair decay gradient (pallas_forward.CROSSING_DG_MODES): its oracle
#    check, then the learned scalar decay at B=1 T=16K, to set against step 2's row.
set -uo pipefail
out=${1:?output folder}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}
k=benchmarks/bench_kernels.py
timeout 100 python3 $k --check-only --quick-check --tag checks_split --out "$out"
timeout 200 python3 $k --no-check --shapes 1x16384 --impls pallas,fla,xla --tag kernels_16k \
  --out "$out"
timeout 150 python3 $k --no-check --shapes 4x16384,1x65536 --impls pallas,fla \
  --tag kernels_long --out "$out"
timeout 100 python3 $k --check-only --quick-check --crossing-dg --tag checks_crossing \
  --out "$out"
timeout 100 python3 $k --no-check --shapes 1x16384 --impls pallas --forms simple_gla --crossing-dg \
  --tag kernels_16k_crossing --out "$out"
