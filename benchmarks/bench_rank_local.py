"""What LASP-2 adds to one rank's attention, for each decay form, on one device.

A mesh of one device runs ``lasp2_causal`` in each of its two forms (the gather is then a
copy), next to the plain ``chunk_attention`` call of the same backend on the same inputs. The
difference is the per-rank work of LASP-2 outside the attention kernels: the summary and the
state gradient (state-first form), or the incoming-state pass (overlapped form).

    python benchmarks/bench_rank_local.py [--forms basic,lightning,simple_gla,gla]
                                          [--shape 1x16384] [--tag rank_local]
    python benchmarks/bench_rank_local.py --profile   # also each call's device events
    python benchmarks/bench_rank_local.py --quick     # CPU dry run in interpret mode

bf16, H=16, D=128, causal; forward and forward+backward medians (``bench_kernels.time_calls``),
the decay differentiated where it is learned (simple GLA, GLA). Writes <out>/<tag>.json and
prints a table last.
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
from jax.sharding import PartitionSpec as P  # noqa: E402

from benchmarks import bench_kernels as BK  # noqa: E402
from benchmarks.profile_kernels import traced_events  # noqa: E402
from lasp2_jax.kernels import get_backend  # noqa: E402
from lasp2_jax.parallel.lasp2 import lasp2_causal  # noqa: E402

CHUNK = 64


def rank_calls(form: str, backend: str, shape, g):
    """{name: (forward, forward+backward)} jitted calls of q, k, v, g (and do): the plain
    attention and LASP-2's two forms on a mesh of one device."""
    be = get_backend(backend)
    B, T, H, D = shape
    scale = D ** -0.5
    mesh = jax.make_mesh((1,), ("sp",))
    learned = form in BK.LEARNED_DECAY

    def plain(q, k, v, g_):
        return be.chunk_attention(q, k, v, BK.canonical(g_, B, T, H), scale=scale,
                                  chunk_size=CHUNK)[0]

    def lasp2(overlap):
        def region(q, k, v, g_):
            s0 = jnp.zeros((B, H, D, D), jnp.float32)
            return lasp2_causal(q, k, v, g_, s0, "sp", scale, CHUNK, be, False, 1, overlap)[0]

        # One device: its share of the sequence is all of it, so the specs replicate.
        mapped = jax.shard_map(region, mesh=mesh, in_specs=(P(),) * 4, out_specs=P(),
                               check_vma=False)
        return lambda q, k, v, g_: mapped(q, k, v, BK.canonical(g_, B, T, H))

    def calls(attn):
        def fwd_bwd(q, k, v, g_, do):
            if g_ is not None and learned:
                o, vjp = jax.vjp(attn, q, k, v, g_)
            else:
                o, vjp = jax.vjp(lambda a, b, c: attn(a, b, c, g_), q, k, v)
            return o, vjp(do)
        return jax.jit(attn), jax.jit(fwd_bwd)

    if g is not None and g.ndim == 1:  # Lightning's [H] decay: a [B, T, H] array for shard_map
        g = jnp.broadcast_to(g, (B, T, H))
    return {"attention": calls(plain), "lasp2_state_first": calls(lasp2(False)),
            "lasp2_overlap": calls(lasp2(True))}, g


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--forms", default="basic,lightning,simple_gla,gla")
    p.add_argument("--shape", default="1x16384", help="BxT (H=16, D=128)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--profile", action="store_true",
                   help="also trace each forward+backward and list its device events")
    p.add_argument("--quick", action="store_true", help="tiny shape (CPU dry run)")
    p.add_argument("--tag", default="rank_local")
    p.add_argument("--out", default=BK.RESULTS)
    args = p.parse_args()
    B, T = (int(x) for x in args.shape.split("x"))
    H, D = (2, 64) if args.quick else (16, 128)
    if args.quick:
        B, T = 1, 256
    rng = np.random.default_rng()
    q, k, v, do = (jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.bfloat16) for _ in range(4))
    device = jax.devices()[0].device_kind
    rows = []
    for form in args.forms.split(","):
        gn = BK.make_decay(rng, form, B, T, H, D)
        g = None if gn is None else jnp.asarray(gn)
        named, g = rank_calls(form, args.backend, (B, T, H, D), g)
        for name, (fwd, fwd_bwd) in named.items():
            call_fwd = functools.partial(fwd, q, k, v, g)
            call_fwd_bwd = functools.partial(fwd_bwd, q, k, v, g, do)
            t_f = BK.time_calls(call_fwd, BK.jax_sync)
            t_fb = BK.time_calls(call_fwd_bwd, BK.jax_sync)
            row = dict(form=form, call=name, fwd_ms=t_f, fwd_bwd_ms=t_fb)
            print(f"{form:10s} {name:18s} fwd {t_f:8.3f} ms  fwd+bwd {t_fb:8.3f} ms", flush=True)
            if args.profile:
                events, total = traced_events(call_fwd_bwd, calls=5)
                row.update(fwd_bwd_device_ms=total, fwd_bwd_events=events)
                for event, ms in events[:12]:
                    print(f"    {ms:8.4f}  {event}")
            rows.append(row)
    out = dict(device=device, jax=jax.__version__, B=B, T=T, H=H, D=D, backend=args.backend,
               rows=rows)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.tag}.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(f"\n{device}, jax {jax.__version__}, B={B} T={T} H={H} D={D} bf16 (median ms)")
    print(f"{'form':10s} {'call':18s} {'fwd':>8s} {'fwd+bwd':>8s} {'x attention':>12s}")
    base = {r["form"]: r for r in rows if r["call"] == "attention"}
    for r in rows:
        ratio = r["fwd_bwd_ms"] / base[r["form"]]["fwd_bwd_ms"]
        print(f"{r['form']:10s} {r['call']:18s} {r['fwd_ms']:8.3f} {r['fwd_bwd_ms']:8.3f} "
              f"{ratio:11.2f}x")


if __name__ == "__main__":
    main()
