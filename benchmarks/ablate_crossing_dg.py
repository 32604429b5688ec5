"""What each part of a scalar decay's gradient costs: the simple-GLA backward with parts of it
replaced by cheaper stand-ins (timing only: those gradients are wrong on purpose), against
Lightning, whose fixed decay has no gradient. Kernel times come from a profiler trace.

    python benchmarks/ablate_crossing_dg.py [--shape 1x16384] [--out DIR]   # crossing form
    python benchmarks/ablate_crossing_dg.py --anchored     # the anchored form (the default)
    python benchmarks/ablate_crossing_dg.py --quick        # CPU dry run, tiny shape

Crossing form: its two per-chunk sums replaced by zeros. Anchored form: q dq and k dk as
x * (the f32 gradient) without the decayed operand rounded as the state matmuls round it
("unrounded"), as the row sums of x alone ("x_only": the loads of q in the dq kernel and of k
in the dk kernel stay), or as zeros (those loads go too); "few_anchors": one anchor per segment.

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
from lasp2_jax.kernels import pallas_backward as PB  # noqa: E402
from lasp2_jax.kernels import pallas_crossing as PC  # noqa: E402
from lasp2_jax.kernels import pallas_forward as PF  # noqa: E402

PARTS = ("inside_and_entering_sums", "leaving_and_passing_sums")
_ZEROS = {  # each part's stand-in: zeros of its [C] output
    "inside_and_entering_sums": lambda q, k, wdp, inter, c: jnp.zeros((c,), jnp.float32),
    "leaving_and_passing_sums": lambda k, inter, s, dh, fa: jnp.zeros((k.shape[0],),
                                                                      jnp.float32),
}
CASES = [("lightning", ()), ("simple_gla", ()), ("simple_gla", PARTS[:1]),
         ("simple_gla", PARTS[1:]), ("simple_gla", PARTS)]


def _unrounded(x, intra, scores, y, f, inter, split):
    return x.astype(jnp.float32) * (intra + (inter if f is None else inter * f))


# The anchored form's stand-ins for pallas_backward._difference_side ([C, block] before the row
# sum), and the anchor spacing (one per segment of up to 4096 chunks).
_ANCHORED = {
    "unrounded": (PB, "_difference_side", _unrounded),
    "x_only": (PB, "_difference_side", lambda x, *_: x.astype(jnp.float32)),
    "zeros": (PB, "_difference_side", lambda x, intra, *_: jnp.zeros_like(intra)),
    "few_anchors": (PF, "DG_ANCHOR_CHUNKS", 4096),
}
ANCHORED_CASES = [("lightning", ()), ("simple_gla", ()), ("simple_gla", ("unrounded",)),
                  ("simple_gla", ("x_only",)), ("simple_gla", ("zeros",)),
                  ("simple_gla", ("zeros", "few_anchors"))]


def run_case(form, off, shape, calls, anchored=False):
    B, T, H, D = shape
    swaps = ({n: _ANCHORED[n] for n in off} if anchored
             else {n: (PC, n, _ZEROS[n]) for n in off})
    originals = {n: getattr(module, attr) for n, (module, attr, _) in swaps.items()}
    with BK.switched(None if anchored else "crossing"):  # crossing: not the default form
        try:
            for module, attr, stand_in in swaps.values():
                setattr(module, attr, stand_in)
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
            for n, value in originals.items():
                setattr(swaps[n][0], swaps[n][1], value)
            jax.clear_caches()
    kernels = {e.replace("lasp2_chunk_attention_bwd_", ""): ms for e, ms in events
               if e.startswith("lasp2_chunk_attention_bwd_")}
    return dict(form=form, replaced=list(off), fwd_bwd_ms=median, device_ms=total,
                kernels_ms=kernels)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="1x16384", help="BxT")
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="tiny shape (CPU dry run)")
    p.add_argument("--anchored", action="store_true",
                   help="the anchored form's parts instead of the crossing form's")
    p.add_argument("--tag", default=None, help="default: ablate_crossing_dg or "
                                               "ablate_anchored_dg")
    p.add_argument("--out", default=BK.RESULTS)
    args = p.parse_args()
    B, T = (int(x) for x in args.shape.split("x"))
    shape = (1, 256, 2, 32) if args.quick else (B, T, 16, 128)
    calls = 2 if args.quick else args.calls
    dev = jax.devices()[0]
    tag = args.tag or ("ablate_anchored_dg" if args.anchored else "ablate_crossing_dg")
    result = dict(device=dev.device_kind, jax=jax.__version__, shape=shape,
                  form="anchored" if args.anchored else "crossing", cases=[])
    for form, off in ANCHORED_CASES if args.anchored else CASES:
        result["cases"].append(run_case(form, off, shape, calls, args.anchored))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, tag + ".json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{dev.device_kind}, jax {jax.__version__}, [B, T, H, D] = {list(shape)} bf16")
    print(f"{'form':10s} {'replaced':45s} {'fwd+bwd':>8} {'dq':>7} {'dk':>7} {'dv':>7}")
    for r in result["cases"]:
        ks = r["kernels_ms"]
        print(f"{r['form']:10s} {'+'.join(r['replaced']) or '-':45s} {r['fwd_bwd_ms']:8.3f} "
              + " ".join(f"{ks.get(n, float('nan')):7.3f}" for n in ("dq", "dk", "dv")))


if __name__ == "__main__":
    main()
