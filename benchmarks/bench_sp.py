"""Sequence-parallel attention benchmark: LASP-2 (as linear_attention runs it, and each of its
two forms forced), LASP-1, linear attention over all-gathered K and V, and softmax Ring /
all-gather (LASP-2H) attention; gather splits; and, at the --overlap-at lengths, the share of
the all-gather hidden behind the local attention, from timings and from a profiler trace of
each LASP-2 form (collective, exposed and compute milliseconds, top kernels).

One layer shaped like Linear-Llama3-1B (H=16, D=128), bf16, causal: forward+backward and
forward medians.

  python benchmarks/bench_sp.py --sp 4                     # on a 4-GPU machine
  python benchmarks/bench_sp.py --quick                    # CPU dry run on 8 fake devices

Writes benchmarks/results/sp_<card>_sp<W>.json and a PNG (tokens/s against length, like the
paper's Figure 3) and prints a table last.
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import re
import shutil
import sys
import tempfile
import time

if "--quick" in sys.argv:
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)
import lasp2_jax  # noqa: E402
from lasp2_jax.kernels import get_backend  # noqa: E402
from lasp2_jax.parallel import lasp1_linear_attention, ring_softmax_attention  # noqa: E402
from lasp2_jax.parallel.lasp2 import (  # noqa: E402
    enter_state,
    gather_states,
    lasp2_causal,
)

QKV = P("dp", "sp", "tp", None)


def timed(fn, *args, warmup=2, reps=5):
    """Median wall time (ms) of a jitted function, synchronised on its outputs."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def fwd_bwd(attn):
    """jit of the output o = attn(q, k, v) and the gradients of <o, w> with respect to q, k,
    v. The output is returned too, as a training step needs it: with the gradients alone XLA
    may drop the forward's output kernel of a linear attention, whose backward does not read o
    (until v10 this benchmark took the gradients only)."""
    def run(q, k, v, w):
        o, vjp = jax.vjp(attn, q, k, v)
        return o, vjp(w.astype(o.dtype))
    return jax.jit(run)


def lasp2_split(mesh, splits, backend, overlap=None):
    """LASP-2 with its state gather sent as ``splits`` pieces (Table 5); overlap as in
    lasp2_causal (None: its cost model chooses)."""
    be = get_backend(backend)

    def region(q, k, v):
        s0 = jnp.zeros(q.shape[:1] + q.shape[2:3] + (q.shape[3], v.shape[3]), jnp.float32)
        o, _ = lasp2_causal(q, k, v, None, s0, "sp", q.shape[3] ** -0.5, 64, be, False, splits,
                            overlap)
        return o

    return jax.shard_map(region, mesh=mesh, in_specs=(QKV,) * 3, out_specs=QKV,
                         check_vma=False)


def allgather_kv_linear(mesh, backend):
    """Baseline: every rank gathers all K, V and forms the state of its prefix itself."""
    be = get_backend(backend)

    def region(q, k, v):
        L = q.shape[1]
        rank = jax.lax.axis_index("sp")
        k_all, v_all = (jax.lax.all_gather(x, "sp", axis=1, tiled=True) for x in (k, v))
        before = (jnp.arange(k_all.shape[1]) < rank * L)[None, :, None, None]
        s_in, _ = be.state_summary(jnp.where(before, k_all, 0), v_all, None)
        o, _ = be.chunk_attention(q, k, v, None, scale=q.shape[3] ** -0.5, chunk_size=64,
                                  initial_state=s_in)
        return o

    return jax.shard_map(region, mesh=mesh, in_specs=(QKV,) * 3, out_specs=QKV,
                         check_vma=False)


def methods(mesh, backend):
    lin = dict(mesh=mesh, backend=backend)
    return {
        "lasp2": lambda q, k, v: lasp2_jax.linear_attention(q, k, v, **lin),
        # the two ways lasp2_causal can take (the line above lets its cost model choose)
        "lasp2_overlap": lasp2_split(mesh, 1, backend, overlap=True),
        "lasp2_state_first": lasp2_split(mesh, 1, backend, overlap=False),
        "lasp1": lambda q, k, v: lasp1_linear_attention(q, k, v, **lin),
        "allgather_kv_linear": allgather_kv_linear(mesh, backend),
        "softmax_allgather": lambda q, k, v: lasp2_jax.softmax_attention(q, k, v, mesh=mesh),
        "softmax_allgather_pallas": lambda q, k, v: lasp2_jax.softmax_attention(
            q, k, v, mesh=mesh, backend="pallas"),
        "softmax_ring": lambda q, k, v: ring_softmax_attention(q, k, v, mesh=mesh),
    }


def overlap_report(mesh, q, k, v, backend, hlo_path):
    """Share of the state all-gather hidden behind the local attention, in LASP-2's overlapped
    form (lasp2_causal's overlap=True), from timings of separate calls.

    t_local: the same per-device work with no communication (local attention and the
    incoming-state term); t_gather: the all-gather of the packed summaries alone; t_lasp2: all
    of it. Hidden share = (t_local + t_gather - t_lasp2) / t_gather, in [0, 1].
    Also saves the scheduled HLO and lists what runs between all-gather-start and -done.
    """
    be = get_backend(backend)
    W = mesh.shape["sp"]
    scale = q.shape[3] ** -0.5

    def local_only(q, k, v):
        s0 = jnp.zeros(q.shape[:1] + q.shape[2:3] + (q.shape[3], v.shape[3]), jnp.float32)
        if be.late_state:  # lasp2_causal's overlapped form on such a backend
            summaries, m = be.segment_summaries(k, v, None, q=q, chunk_size=64)
            # a zero incoming state that, like the gathered one, depends on the local summary
            o, _ = be.chunk_attention(q, k, v, None, scale=scale, chunk_size=64,
                                      initial_state=s0 + 0 * m, segment_summaries=summaries,
                                      late_state=True)
            return o
        o_zero, m = be.chunk_attention(q, k, v, None, scale=scale, chunk_size=64)
        o, _ = enter_state(o_zero, m, q, None, s0 + 0 * m, scale)
        return o

    def gather_only(packed):
        return gather_states(packed[0], "sp")[None]

    smap = functools.partial(jax.shard_map, mesh=mesh, check_vma=False)
    f_local = jax.jit(smap(local_only, in_specs=(QKV,) * 3, out_specs=QKV))
    # The packed per-rank summaries [W, B, H, Dk, Dv + 1], one slice per rank: the gather alone.
    packed = jnp.zeros((W, q.shape[0], q.shape[2], q.shape[3], v.shape[3] + 1), jnp.float32)
    f_gather = jax.jit(smap(gather_only, in_specs=P("sp"), out_specs=P("sp")))
    f_lasp2 = jax.jit(lasp2_split(mesh, 1, backend, overlap=True))
    t_local, t_lasp2 = (timed(f, q, k, v) for f in (f_local, f_lasp2))
    t_gather = timed(f_gather, packed)
    hidden = (t_local + t_gather - t_lasp2) / t_gather if W > 1 else 0.0
    hlo = f_lasp2.lower(q, k, v).compile().as_text()
    with open(hlo_path, "w") as f:  # source paths relative to the repository
        f.write(hlo.replace(_REPO + os.sep, ""))
    between = []
    lines = hlo.splitlines()
    start = [i for i, line in enumerate(lines) if re.search(r"all-gather-start\(", line)]
    done = [i for i, line in enumerate(lines) if re.search(r"all-gather-done\(", line)]
    if start and done:
        for line in lines[start[0] + 1:done[0]]:
            m = re.search(r"= \S+ (\w[\w-]*)\(", line)
            if m:
                target = re.search(r'custom_call_target="([^"]+)"', line)
                kernel = re.search(r'name\W+(lasp2_\w+)', line)  # a Pallas kernel's name
                between.append(m.group(1) + (f":{target.group(1)}" if target else "")
                               + (f":{kernel.group(1)}" if kernel else ""))
    return dict(t_local_ms=t_local, t_gather_ms=t_gather, t_lasp2_ms=t_lasp2,
                hidden_share=float(np.clip(hidden, 0.0, 1.0)),
                ops_between_gather_start_and_done=between[:40],
                n_ops_between=len(between))


def traced_overlap(fn, args, calls: int = 5):
    """From a profiler trace of `calls` calls of fn(*args): device milliseconds per call (per
    device) of the collectives, of those not overlapped by any compute kernel on the same
    device, and of the compute. hidden_share = 1 - exposed / collective. Unlike the timings of
    overlap_report, this sees the gather's own kernels, not a separate call's launch and
    synchronisation."""
    from benchmarks.profile_train import summarize  # the training profiler's summary

    jax.block_until_ready(fn(*args))
    folder = tempfile.mkdtemp(prefix="bench_sp_trace_")
    try:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            r = None
            for _ in range(calls):
                r = fn(*args)
            jax.block_until_ready(r)
        path = glob.glob(os.path.join(folder, "**", "perfetto_trace.json.gz"), recursive=True)
        s = summarize(path[0], calls, top=8)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    comm = s["ms_per_step"].get("collective", 0.0)
    exposed = s["exposed_collective_ms_per_step"]
    return dict(collective_ms=comm, exposed_ms=exposed,
                compute_ms=sum(v for c, v in s["ms_per_step"].items() if c != "collective"),
                hidden_share=(1.0 - exposed / comm) if comm > 0 else None,
                top_events_ms=s["top_events_ms_per_step"])


def check_against_one_device(mesh, backend, T, H, D, dtype):
    """LASP-2 over the mesh against the same op on one device: outputs and gradients."""
    rng = np.random.default_rng(1)
    q, k, v, w = (jnp.asarray(rng.standard_normal((1, T, H, D)), dtype) for _ in range(4))
    g = jnp.asarray(-rng.uniform(0.001, 0.1, (1, T, H)), jnp.float32)

    def grads(m):
        def loss(q, k, v, g):
            o = lasp2_jax.linear_attention(q, k, v, log_decay=g, mesh=m, backend=backend)
            return jnp.sum(o.astype(jnp.float32) * w)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, g)

    (l1, g1), (l2, g2) = grads(mesh), grads(None)
    errs = [float(jnp.linalg.norm((a - b).astype(jnp.float32))
                  / jnp.linalg.norm(b.astype(jnp.float32))) for a, b in zip(g1, g2)]
    print(f"check sp={mesh.shape['sp']} vs one device, T={T}: loss {float(l1):.4f} vs "
          f"{float(l2):.4f}; grad rel errors q,k,v,g = {[f'{e:.1e}' for e in errs]}",
          flush=True)
    if not max(errs) < 2e-2:
        raise SystemExit("sequence-parallel result differs from one device")
    return errs


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sp", type=int, default=None, help="default: all devices")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--lengths", default="65536,262144,1048576")
    ap.add_argument("--softmax-max", type=int, default=65536,
                    help="longest sequence for the (quadratic) softmax methods")
    ap.add_argument("--splits", default="1,4,16,64")
    ap.add_argument("--split-at", type=int, default=None,
                    help="the length of the gather-split ablation (default: the longest)")
    ap.add_argument("--methods", default=None, help="comma list (default: all)")
    ap.add_argument("--overlap-at", default=None,
                    help="comma list of lengths for the overlap report (default: the first)")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--budget-s", type=float, default=420, help="stop starting new cases after")
    ap.add_argument("--quick", action="store_true", help="tiny CPU dry run")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    if args.quick:
        args.heads, args.dim, args.lengths, args.softmax_max = 4, 16, "256,512", 512
        args.splits = "1,4"
    os.makedirs(args.out, exist_ok=True)
    W = args.sp or jax.device_count()
    mesh = lasp2_jax.make_mesh(sp=W, devices=jax.devices()[:W])
    card = jax.devices()[0].device_kind
    dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    print(f"# {card} x{W}, jax {jax.__version__}, backend {args.backend}, H={args.heads}, "
          f"D={args.dim}, {jnp.dtype(dtype).name}", flush=True)
    check_errs = check_against_one_device(mesh, args.backend, 8 * 1024 if not args.quick else 256,
                                          args.heads, args.dim, dtype)
    t_start = time.time()
    rows = []
    lengths = [int(x) for x in args.lengths.split(",")]

    def inputs(T):
        """q, k, v and the loss weights, drawn on the devices already split over 'sp' (host
        random numbers for 1M tokens took minutes)."""
        shape = (1, T, args.heads, args.dim)
        draw = jax.jit(lambda key: tuple(jax.random.normal(kk, shape, dtype)
                                         for kk in jax.random.split(key, 4)),
                       out_shardings=NamedSharding(mesh, P(None, "sp")))
        return draw(jax.random.key(T))

    overlap = []  # one report per length in --overlap-at
    overlap_at = ([int(x) for x in args.overlap_at.split(",")] if args.overlap_at
                  else lengths[:1])
    tag = f"sp_{card.replace(' ', '_')}_sp{W}" + ("_quick" if args.quick else "")

    def save():  # after every case, so a run cut short keeps what it measured
        result = dict(card=card, devices=W, jax=jax.__version__, heads=args.heads, dim=args.dim,
                      dtype=jnp.dtype(dtype).name, rows=rows, overlap=overlap,
                      check_grad_rel_errors=check_errs)
        with open(os.path.join(args.out, tag + ".json"), "w") as f:
            json.dump(result, f, indent=1)

    for T in lengths:
        if time.time() - t_start > args.budget_s:
            print(f"budget reached, skipping T={T} and longer", flush=True)
            break
        q, k, v, w = inputs(T)
        all_methods = methods(mesh, args.backend)
        cases = {name: fn for name, fn in all_methods.items()
                 if args.methods is None or name in args.methods.split(",")}
        if T == (args.split_at or lengths[-1]):  # Table 5: the gather split into pieces
            for n in [int(s) for s in args.splits.split(",")]:
                if n > 1:
                    cases[f"lasp2_split{n}"] = lasp2_split(mesh, n, args.backend)
        for name, attn in cases.items():
            if name.startswith("softmax") and T > args.softmax_max:
                continue
            try:
                ms = timed(fwd_bwd(attn), q, k, v, w)
                # The forward alone: the gradient of <o, w> needs no value of o, so XLA drops
                # the output kernels from the timing above (a model's next layer would not).
                ms_f = timed(jax.jit(attn), q, k, v)
            except Exception as e:  # out of memory at the longest lengths
                print(f"T={T} {name}: failed ({type(e).__name__}: {str(e)[:120]})", flush=True)
                continue
            rows.append(dict(method=name, T=T, sp=W, fwd_bwd_ms=ms, fwd_ms=ms_f,
                             tokens_per_s=T / ms * 1e3))
            save()
            print(f"T={T:>8} {name:<22} fwd+bwd {ms:9.2f} ms  fwd {ms_f:8.2f} ms  "
                  f"{T / ms * 1e3:14.0f} tok/s", flush=True)
        if T in overlap_at:
            report = overlap_report(mesh, q, k, v, args.backend,
                                    os.path.join(args.out, f"{tag}_hlo_{T}.txt"))
            report["T"] = T
            summary = {k: v for k, v in report.items() if k.startswith(("t_", "hidden"))}
            for name in ("lasp2_overlap", "lasp2_state_first"):  # both ways, traced
                attn = all_methods[name]
                for key, fn, fargs in (("fwd", jax.jit(attn), (q, k, v)),
                                       ("fwd_bwd", fwd_bwd(attn), (q, k, v, w))):
                    trace = traced_overlap(fn, fargs)
                    report[f"trace_{name}_{key}"] = trace
                    summary[f"{name}_{key}"] = {k: v if v is None else round(v, 4)
                                                for k, v in trace.items()
                                                if k != "top_events_ms"}
            overlap.append(report)
            save()
            print(f"overlap at T={T}: {json.dumps(summary)}", flush=True)

    save()
    _plot(rows, os.path.join(args.out, tag + ".png"), f"{card} x{W}")
    _table(rows)


def _plot(rows, path, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in sorted({r["method"] for r in rows}):
        pts = sorted((r["T"], r["tokens_per_s"]) for r in rows if r["method"] == name)
        ax.plot(*zip(*pts), marker="o", label=name)
    ax.set(xscale="log", yscale="log", xlabel="sequence length (tokens)",
           ylabel="tokens/s (fwd+bwd, one layer)", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _table(rows):
    names = sorted({r["method"] for r in rows})
    lengths = sorted({r["T"] for r in rows})
    print("\nfwd+bwd ms    " + "".join(f"{n:>22}" for n in names))
    for T in lengths:
        cells = []
        for n in names:
            ms = [r["fwd_bwd_ms"] for r in rows if r["T"] == T and r["method"] == n]
            cells.append(f"{ms[0]:22.2f}" if ms else f"{'-':>22}")
        print(f"T={T:<10} " + "".join(cells))


if __name__ == "__main__":
    main()
