"""Where the pallas backend's time goes, kernel by kernel: a profiler trace of a few calls of
the forward and of the forward+backward for each decay form, at one shape (bf16, H=16, D=128).

    python benchmarks/profile_kernels.py [--forms basic,lightning,simple_gla] [--shape 1x16384]
    python benchmarks/profile_kernels.py --quick     # CPU dry run in interpret mode, tiny shape

Every device event of the traced calls is listed with its time per call: the Pallas kernels
(named lasp2_*) and the XLA fusions around them (the decay tables, padding, the reverse cumsum
of the decay gradient). The difference between a decay form and the basic form is what the
decay costs, kernel by kernel. Writes <out>/<tag>.json and prints the table last.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import bench_kernels as BK  # noqa: E402
from benchmarks.profile_train import summarize  # noqa: E402
from lasp2_jax.kernels import pallas_forward  # noqa: E402


def traced_events(fn, calls: int):
    """[(event name, ms per call)] of the device events of `calls` calls of fn(), and the
    total. fn is warmed up (compiled) first; the trace is written to a temporary folder."""
    jax.block_until_ready(fn())
    folder = tempfile.mkdtemp(prefix="profile_kernels_")
    try:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            r = None
            for _ in range(calls):
                r = fn()
            jax.block_until_ready(r)
        path = glob.glob(os.path.join(folder, "**", "perfetto_trace.json.gz"), recursive=True)[0]
        s = summarize(path, calls, top=50)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return s["top_events_ms_per_step"], sum(s["ms_per_step"].values())


def profile_form(form: str, B: int, T: int, H: int, D: int, calls: int, hlo_dir=None):
    rng = np.random.default_rng()
    q, k, v, do = (jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.bfloat16)
                   for _ in range(4))
    gn = BK.make_decay(rng, form, B, T, H, D)
    g = None if gn is None else jnp.asarray(gn)
    fwd, fwd_bwd = BK.jax_calls("pallas", q.shape, D ** -0.5)
    if hlo_dir:  # the compiled forward, to see what the XLA fusions around the kernels do
        with open(os.path.join(hlo_dir, f"hlo_{form}_fwd.txt"), "w") as f:
            f.write(fwd.lower(q, k, v, g).compile().as_text())
    out = {}
    for name, fn in (("fwd", lambda: fwd(q, k, v, g)),
                     ("fwd_bwd", lambda: fwd_bwd(q, k, v, g, do))):
        events, total = traced_events(fn, calls)
        out[name] = dict(total_ms=total, events=events)
        BK.log(f"{form:10s} {name:8s} device total {total:.3f} ms per call")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--forms", default="basic,lightning,simple_gla")
    p.add_argument("--shape", default="1x16384", help="BxT")
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--crossing-dg", action="store_true",
                   help="the scalar decay's gradient summed over crossing pairs (default: the "
                        "difference form, q dq - k dk with the states split)")
    p.add_argument("--variant", default="",
                   help="switches of bench_kernels.py to trace the kernels under (as there, "
                        "combined with +)")
    p.add_argument("--hlo", action="store_true", help="also write the compiled forward's HLO")
    p.add_argument("--quick", action="store_true", help="tiny shape (CPU dry run)")
    p.add_argument("--tag", default="profile_kernels")
    p.add_argument("--out", default=BK.RESULTS)
    args = p.parse_args()
    if args.crossing_dg:
        BK.set_switches("crossing")
    if args.variant:
        if not BK.is_switch_variant(args.variant):
            p.error(f"unknown switches {args.variant!r}: {', '.join(BK.SWITCHES)}")
        BK.set_switches(args.variant)
    B, T = (int(x) for x in args.shape.split("x"))
    H, D = (2, 32) if args.quick else (16, 128)
    T, calls = (256, 2) if args.quick else (T, args.calls)
    dev = jax.devices()[0]
    os.makedirs(args.out, exist_ok=True)
    result = dict(device=dev.device_kind, jax=jax.__version__, B=B, T=T, H=H, D=D,
                  crossing_dg_modes=sorted(pallas_forward.CROSSING_DG_MODES),
                  variant=args.variant, forms={})
    for form in args.forms.split(","):
        result["forms"][form] = profile_form(form, B, T, H, D, calls,
                                             args.out if args.hlo else None)
    with open(os.path.join(args.out, args.tag + ".json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{dev.device_kind}, jax {jax.__version__}, B={B} T={T} H={H} D={D} bf16: "
          "device ms per call")
    for form, passes in result["forms"].items():
        for name, r in passes.items():
            print(f"{form} {name}: total {r['total_ms']:.3f}")
            for event, ms in r["events"]:
                print(f"    {ms:8.4f}  {event[:90]}")


if __name__ == "__main__":
    main()
