"""The incoming state's term of LASP-2's overlapped form, o = o_zero + scale * (exp(b) q) S:
the Pallas kernel (pallas_entry.add_state_term) at several tilings against the XLA formula
(parallel.lasp2.enter_state), on one device, with the HBM floor of its one pass.

    python benchmarks/bench_state_entry.py [--shape 1x16384] [--tag state_entry]
    python benchmarks/bench_state_entry.py --quick     # CPU dry run in interpret mode

bf16, H=16, D=128, a scalar decay (the kernel's per-token factor); medians of
``bench_kernels.time_calls``. Checks each variant against the XLA formula first (bf16, relative
error of the output), writes <out>/<tag>.json and prints a table last.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import bench_kernels as BK  # noqa: E402
from lasp2_jax.kernels import pallas_entry, pallas_scans  # noqa: E402
from lasp2_jax.parallel.lasp2 import enter_state  # noqa: E402

CHUNK = 64
# (block_v, num_warps, chunks per program)
VARIANTS = [(64, 4, 1), (64, 4, 8), (128, 8, 1), (128, 8, 8), (128, 4, 8)]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="1x16384", help="BxT (H=16, D=128)")
    p.add_argument("--quick", action="store_true", help="tiny shape (CPU dry run)")
    p.add_argument("--tag", default="state_entry")
    p.add_argument("--out", default=BK.RESULTS)
    args = p.parse_args()
    B, T = (int(x) for x in args.shape.split("x"))
    H, D = 16, 128
    if args.quick:
        B, T, H = 1, 512, 2
    rng = np.random.default_rng()
    q, o_zero = (jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.bfloat16) for _ in range(2))
    g = jnp.asarray(BK.make_decay(rng, "simple_gla", B, T, H, D))
    s = jnp.asarray(rng.standard_normal((B, H, D, D)), jnp.float32)
    scale = D ** -0.5
    m = jnp.zeros_like(s)

    @jax.jit
    def xla(o_zero, q, g, s):
        return enter_state(o_zero, m, q, g, s, scale)[0]

    # The kernel's factors from the chunk-local tables, as the Pallas backend builds them.
    bf, cnt = pallas_scans.decay_tables(g, CHUNK)
    rows = pallas_entry.scalar_factors(bf, cnt, CHUNK)
    want = np.asarray(xla(o_zero, q, g, s), np.float32)
    bw = BK.copy_bandwidth()
    floor_ms = 3 * B * T * H * D * 2 / (bw * 1e9) * 1e3  # read q and o_zero, write o
    rows_out = [dict(impl="xla",
                     ms=BK.time_calls(functools.partial(xla, o_zero, q, g, s), BK.jax_sync))]
    for bv, warps, chunks in VARIANTS:
        fn = jax.jit(functools.partial(pallas_entry.add_state_term, scale=scale, chunk=CHUNK,
                                       block_v=bv, num_warps=warps, chunks_per_program=chunks))
        got = np.asarray(fn(o_zero, q, s, rows=rows), np.float32)
        err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
        ms = BK.time_calls(functools.partial(fn, o_zero, q, s, rows=rows), BK.jax_sync)
        rows_out.append(dict(impl=f"pallas bv{bv} w{warps} c{chunks}", ms=ms, rel_err=err))
    device = jax.devices()[0].device_kind
    out = dict(device=device, jax=jax.__version__, B=B, T=T, H=H, D=D, copy_GBps=bw,
               floor_ms=floor_ms, rows=rows_out)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.tag}.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(f"\n{device}, jax {jax.__version__}, B={B} T={T} H={H} D={D} bf16; HBM floor "
          f"{floor_ms:.3f} ms at {bw:.0f} GB/s")
    for r in rows_out:
        err = f"  rel err {r['rel_err']:.1e}" if "rel_err" in r else ""
        print(f"{r['impl']:24s} {r['ms']:8.4f} ms  {floor_ms / r['ms']:5.2f} of the floor{err}")


if __name__ == "__main__":
    main()
