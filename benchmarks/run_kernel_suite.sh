#!/usr/bin/env bash
# The kernel measurements of the README (issue: Pallas kernels) in one go on one GPU.
# Usage: benchmarks/run_kernel_suite.sh OUT_DIR
# 1. GPU correctness against the float64 oracle (quick set: resets, bf16 for the decays),
#    and the GPU test of the anchored decay gradient in groups of four chunks;
# 2. forward and forward+backward medians of the Pallas kernels, every decay form, at B=1
#    T=16K, then B=4 T=16K and B=1 T=64K;
# 3. where each kernel's time goes (profile_kernels.py, B=1 T=16K);
# 4. the same 16K shape against flash-linear-attention and the xla backend. Last, because
#    FLA's autotuning takes minutes on a fresh machine.
# Each step writes its own JSON; a step cut short by its time limit keeps its rows.
set -uo pipefail
out=${1:?output folder}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}
k=benchmarks/bench_kernels.py
timeout 100 python3 $k --check-only --quick-check --tag checks --out "$out"
JAX_PLATFORMS=cuda timeout 100 python3 -m pytest -q -o addopts="" -m gpu tests/test_pallas_kernels.py \
  -k anchored_groups_of_four
timeout 100 python3 $k --no-check --shapes 1x16384 --impls pallas --tag kernels_16k --out "$out"
timeout 200 python3 $k --no-check --shapes 4x16384,1x65536 --impls pallas --tag kernels_long \
  --out "$out"
timeout 150 python3 benchmarks/profile_kernels.py --forms basic,lightning,simple_gla,gla \
  --out "$out"
timeout 300 python3 $k --no-check --shapes 1x16384 --impls pallas,fla,xla \
  --forms basic,lightning,simple_gla --tag kernels_16k_vs_fla --out "$out"
