"""What each part of the crossing-form decay gradient costs: the simple-GLA backward with parts
of it replaced by zeros (timing only: those gradients are wrong on purpose), against Lightning,
whose fixed decay has no gradient. Kernel times come from a profiler trace.

    python benchmarks/ablate_crossing_dg.py [--shape 1x16384] [--out DIR]
    python benchmarks/ablate_crossing_dg.py --quick        # CPU dry run, tiny shape

Writes <out>/<tag>.json and prints one line per case: the median forward+backward time and
the dq, dk and dv kernels' device times.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import bench_kernels as BK  # noqa: E402
from benchmarks.profile_kernels import traced_events  # noqa: E402
from lasp2_jax.kernels import pallas_crossing as PC  # noqa: E402

PARTS = ("inside_and_entering_sums", "leaving_and_passing_sums")
_ZEROS = {  # each part's stand-in: zeros of its [C] output
    "inside_and_entering_sums": lambda q, k, wdp, inter, c: jnp.zeros((c,), jnp.float32),
    "leaving_and_passing_sums": lambda k, inter, s, dh, fa: jnp.zeros((k.shape[0],),
                                                                      jnp.float32),
}
CASES = [("lightning", ()), ("simple_gla", ()), ("simple_gla", PARTS[:1]),
         ("simple_gla", PARTS[1:]), ("simple_gla", PARTS)]


def run_case(form, off, shape, calls):
    B, T, H, D = shape
    originals = {name: getattr(PC, name) for name in PARTS}
    with BK.switched("crossing"):  # not the default form
        try:
            for name in off:
                setattr(PC, name, _ZEROS[name])
            jax.clear_caches()  # the kernels are traced anew with the stand-ins
            rng = np.random.default_rng(0)
            q, k, v, do = (jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.bfloat16)
                           for _ in range(4))
            gn = BK.make_decay(rng, form, B, T, H, D)
            g = jnp.asarray(gn)
            _, fwd_bwd = BK.jax_calls("pallas", q.shape, D ** -0.5)

            def call():
                return fwd_bwd(q, k, v, g, do)

            events, total = traced_events(call, calls)
            median = BK.time_calls(call, BK.jax_sync)
        finally:
            for name, fn in originals.items():
                setattr(PC, name, fn)
    kernels = {e.replace("lasp2_chunk_attention_bwd_", ""): ms for e, ms in events
               if e.startswith("lasp2_chunk_attention_bwd_")}
    return dict(form=form, zeroed=list(off), fwd_bwd_ms=median, device_ms=total,
                kernels_ms=kernels)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="1x16384", help="BxT")
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="tiny shape (CPU dry run)")
    p.add_argument("--tag", default="ablate_crossing_dg")
    p.add_argument("--out", default=BK.RESULTS)
    args = p.parse_args()
    B, T = (int(x) for x in args.shape.split("x"))
    shape = (1, 256, 2, 32) if args.quick else (B, T, 16, 128)
    calls = 2 if args.quick else args.calls
    dev = jax.devices()[0]
    result = dict(device=dev.device_kind, jax=jax.__version__, shape=shape, cases=[])
    for form, off in CASES:
        result["cases"].append(run_case(form, off, shape, calls))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, args.tag + ".json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{dev.device_kind}, jax {jax.__version__}, [B, T, H, D] = {list(shape)} bf16")
    print(f"{'form':10s} {'zeroed':45s} {'fwd+bwd':>8} {'dq':>7} {'dk':>7} {'dv':>7}")
    for r in result["cases"]:
        ks = r["kernels_ms"]
        print(f"{r['form']:10s} {'+'.join(r['zeroed']) or '-':45s} {r['fwd_bwd_ms']:8.3f} "
              + " ".join(f"{ks.get(n, float('nan')):7.3f}" for n in ("dq", "dk", "dv")))


if __name__ == "__main__":
    main()
