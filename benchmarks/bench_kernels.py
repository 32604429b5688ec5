"""Per-device linear-attention kernels on one GPU: correctness against the float64 oracle, then
forward and forward+backward medians of the pallas and xla backends and of
flash-linear-attention's (FLA) chunk kernels, measured in the same run.

    python benchmarks/bench_kernels.py                # full matrix (bf16, H=16, D=128)
    python benchmarks/bench_kernels.py --quick        # B=1 T=16384 only
    python benchmarks/bench_kernels.py --no-check     # skip the oracle checks
    python benchmarks/bench_kernels.py --doc-len 2048 # packed documents, as training packs them

Writes <out>/<tag>.json and .png (default benchmarks/results/kernels.*).
Decay forms: basic (none), lightning ([H], fixed per head), simple_gla ([B,T,H], data
dependent), gla ([B,T,H,Dk]). FLOP counts are those of the chunked algorithm (C=64); the
HBM floor moves every input and output once at the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lasp2_jax.kernels import pallas, pallas_forward, reference, xla  # noqa: E402

FORMS = ("basic", "lightning", "simple_gla", "gla")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def log(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------------------------------------
# Correctness on the GPU.


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check(rng, B, T, H, Dk, Dv, form, dtype, resets, chunk=64, min_programs=None):
    """Relative errors of one call's outputs and gradients against the float64 oracle, and
    whether two calls agree bit for bit and every value is finite. min_programs: the kernels'
    BlockSizes.min_programs (None: the default, which fills a GPU), which sets the segments."""
    config = pallas.DEFAULT_CONFIG
    if min_programs is not None:
        config = pallas.Config(pallas_forward.BlockSizes(min_programs=min_programs))
    q, k = (rng.standard_normal((B, T, H, Dk)).astype(np.float32) for _ in range(2))
    v = rng.standard_normal((B, T, H, Dv)).astype(np.float32)
    g = None
    if form == "scalar":
        g = np.log(rng.uniform(0.3, 1.0, (B, T, H))).astype(np.float32)
    elif form == "strong":  # strong decays: the exact pair weights, dg far below its terms
        g = np.log(rng.uniform(1e-3, 1e-2, (B, T, H))).astype(np.float32)
    elif form == "per_dim":  # chunk totals near SAFE_LOG_DECAY: often the exact kernels
        g = np.log(rng.uniform(0.3, 1.0, (B, T, H, Dk))).astype(np.float32)
    elif form == "gla":  # GLA-like: the prescaled kernels (without resets)
        g = np.log(rng.uniform(0.9, 1.0, (B, T, H, Dk))).astype(np.float32)
    if g is not None and resets:
        g[:, T // 3] = -np.inf
        g[:, T // 2] = -1e30
    s0 = rng.standard_normal((B, H, Dk, Dv)).astype(np.float32)
    do = rng.standard_normal((B, T, H, Dv)).astype(np.float32)
    dst = rng.standard_normal((B, H, Dk, Dv)).astype(np.float32)
    q, k, v, do = (np.asarray(jnp.asarray(x, dtype).astype(jnp.float32)) for x in (q, k, v, do))
    scale = Dk ** -0.5

    def f(q_, k_, v_, g_, s_):
        return pallas.chunk_linear_attention(q_, k_, v_, g_, scale=scale, chunk_size=chunk,
                                             initial_state=s_, config=config)

    @jax.jit
    def run(q_, k_, v_, g_, s_, do_, dst_):
        (o, st), vjp = jax.vjp(f, q_, k_, v_, g_, s_)
        return (o, st), vjp((do_, dst_))

    args = [jnp.asarray(x, dtype) for x in (q, k, v)] + [
        None if g is None else jnp.asarray(g), jnp.asarray(s0)]
    out1 = run(*args, jnp.asarray(do, dtype), jnp.asarray(dst))
    out2 = run(*args, jnp.asarray(do, dtype), jnp.asarray(dst))
    l1, l2 = jax.tree.leaves(out1), jax.tree.leaves(out2)
    deterministic = all(np.array_equal(np.asarray(a), np.asarray(b))
                        for a, b in zip(l1, l2, strict=True))
    finite = all(np.isfinite(np.asarray(x, np.float32)).all() for x in l1)
    with jax.enable_x64(True):
        def f64(q_, k_, v_, g_, s_):
            return reference.linear_attention_recurrent(q_, k_, v_, g_, scale=scale,
                                                        initial_state=s_)
        a64 = [None if x is None else jnp.asarray(x, jnp.float64) for x in (q, k, v, g, s0)]
        (ro, rst), vjp = jax.vjp(f64, *a64)
        rg = vjp((jnp.asarray(do, jnp.float64), jnp.asarray(dst, jnp.float64)))
        ref = {"o": np.asarray(ro), "final": np.asarray(rst)}
        for n, x in zip(("dq", "dk", "dv", "dg", "ds0"), rg, strict=False):
            if x is not None:
                ref[n] = np.asarray(x)
    (o, st), grads = out1
    got = {"o": o, "final": st}
    for n, x in zip(("dq", "dk", "dv", "dg", "ds0"), grads, strict=False):
        if x is not None:
            got[n] = x
    errs = {n: _rel(got[n], ref[n]) for n in ref}
    return errs, deterministic, finite


CHECK_FORMS = ("none", "scalar", "strong", "per_dim", "gla")


CHECK_CASES = {
    # small, ragged, Dk / Dv not powers of two, few programs -> many segments
    "small": dict(B=2, T=333, H=2, Dk=72, Dv=40),
    # benchmark head size, several segments of several chunks
    "benchmark": dict(B=1, T=4096 + 37, H=4, Dk=128, Dv=128),
    # 16 heads: 8 segments of 9 chunks, so a scalar decay's anchored gradient has groups of 4
    # chunks and one of 1 in every segment (GLA's prescaled kernels, whose groups must divide
    # the 9 chunks, take the split form there)
    "heads16": dict(B=1, T=4096 + 37, H=16, Dk=128, Dv=128),
    # 32 segments of 8 chunks: GLA's anchored decay gradient in two groups of 4 per segment
    # (the other cases give GLA groups of 1 or 2)
    "groups": dict(B=1, T=16384, H=4, Dk=128, Dv=128),
    # the same groups at a size a CPU checks in seconds: one segment of 16 chunks
    "groups_cpu": dict(B=1, T=1024, H=2, Dk=64, Dv=64, min_programs=2),
}


def run_checks(out, quick=False, forms=CHECK_FORMS, case_names=tuple(CHECK_CASES),
               save=lambda: None, dtype_names=("bfloat16", "float32"), variant="", seed=None):
    """The oracle checks of :func:`check`, saved after each one (appended to out["checks"]).
    quick: the benchmark case only, bf16 only, with resets only (and no decay without).
    variant: switches (see switch_changes) the kernels are traced under ("": the defaults).
    seed: of the random inputs (None: fresh ones)."""
    rng = np.random.default_rng(seed)
    rows = []
    out.setdefault("checks", [])
    cases = [CHECK_CASES[n] for n in case_names]
    dtypes = tuple((d, tol) for d, tol in ((jnp.bfloat16, 1e-2), (jnp.float32, 1e-3))
                   if jnp.dtype(d).name in dtype_names)
    for case in [CHECK_CASES["benchmark"]] if quick else cases:
        for form in forms:
            for dtype, tol in dtypes[:1] if quick and form != "none" else dtypes:
                for resets in ((False, True) if form != "none" and not quick else (quick,)):
                    t0 = time.time()
                    try:
                        errs, det, fin = check(rng, **case, form=form, dtype=dtype,
                                               resets=resets)
                    except Exception:
                        traceback.print_exc(limit=3)
                        log("retrying with the exact path only")
                        pallas_forward.FAST_PATH_MODES = frozenset()
                        errs, det, fin = check(rng, **case, form=form, dtype=dtype,
                                               resets=resets)
                    ok = det and fin and max(errs.values()) < tol
                    row = dict(case=case, form=form, dtype=jnp.dtype(dtype).name, resets=resets,
                               variant=variant, errors=errs, deterministic=det, finite=fin,
                               ok=ok, seconds=round(time.time() - t0, 1))
                    rows.append(row)
                    out["checks"].append(row)
                    save()
                    log(f"check {variant + ' ' if variant else ''}{case} {form:8s} "
                        f"{row['dtype']:8s} resets={resets!s:5s} "
                        f"max_err={max(errs.values()):.2e} det={det} finite={fin} "
                        f"{'OK' if ok else 'FAIL'}  " +
                        " ".join(f"{n}={e:.1e}" for n, e in errs.items()))
    return all(r["ok"] for r in rows)


# ---------------------------------------------------------------------------------------------
# Timing.


def time_calls(fn, sync, reps=5, inner=10, warmup=2):
    """Median over reps of the mean time (ms) of `inner` back-to-back calls."""
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        r = None
        for _ in range(inner):
            r = fn()
        sync(r)
        times.append((time.perf_counter() - t0) * 1e3 / inner)
    return statistics.median(times)


def jax_sync(x):
    jax.block_until_ready(x)


# The forms whose decay is learned, so that a training step differentiates it (Lightning's is
# fixed per head, as FLA's g_gamma; basic linear attention's packed documents bring a decay
# that is resets only).
LEARNED_DECAY = ("simple_gla", "gla")


def make_decay(rng, form, B, T, H, Dk, doc_len: int = 0):
    """The form's log decay as the benchmarks feed it: None, [H], [B, T, H] or [B, T, H, Dk]
    float32. doc_len > 0: packed documents of doc_len tokens on average (each token after the
    first starts a new one with probability 1 / doc_len), folded into the decay as a training
    step folds its segment ids (models.mixers.with_resets: -inf at each document's start), so
    every form but GLA becomes a [B, T, H] decay."""
    if form == "basic":
        g = None
    elif form == "lightning":
        h = np.arange(H)
        g = (-(8.0 / H) * (1 - 0.5) * h / 8.0 - 1e-3).astype(np.float32)  # [H]
    elif form == "simple_gla":
        g = np.log(rng.uniform(0.9, 1.0, (B, T, H))).astype(np.float32)
    else:
        g = np.log(rng.uniform(0.9, 1.0, (B, T, H, Dk))).astype(np.float32)
    if doc_len <= 0:
        return g
    from lasp2_jax.models.mixers import with_resets

    starts = rng.uniform(size=(B, T)) < 1.0 / doc_len
    segment_ids = jnp.asarray(np.cumsum(starts, axis=1))
    return np.asarray(with_resets(None if g is None else jnp.asarray(g), segment_ids, B, T, H))


def canonical(g, B, T, H):
    if g is None or g.ndim != 1:
        return g
    return jnp.broadcast_to(jnp.asarray(g), (B, T, H))


def jax_calls(impl, shape, scale, config=None, learned=None):
    """Jitted (forward, forward+backward) of the pallas or xla backend for q of ``shape``
    [B, T, H, D]: fwd(q, k, v, g) -> o and fwd_bwd(q, k, v, g, do) -> gradients, where g is
    None, [H] (Lightning), [B, T, H] or [B, T, H, Dk]. learned: whether the decay is
    differentiated (None: unless it is [H], Lightning's)."""
    B, T, H, _ = shape
    if impl == "pallas":
        cfg = config or pallas.DEFAULT_CONFIG

        def attn(q_, k_, v_, g_):
            return pallas.chunk_linear_attention(q_, k_, v_, canonical(g_, B, T, H), scale=scale,
                                                 config=cfg)[0]
    else:
        def attn(q_, k_, v_, g_):
            return xla.chunk_linear_attention(q_, k_, v_, canonical(g_, B, T, H), scale=scale)[0]

    @jax.jit
    def fwd_bwd(q_, k_, v_, g_, do_):
        differentiated = g_ is not None and (g_.ndim != 1 if learned is None else learned)
        if g_ is not None and not differentiated:
            # Lightning's decay is fixed, not learned (as FLA's g_gamma): no decay gradient.
            o, vjp = jax.vjp(lambda a, b, c: attn(a, b, c, g_), q_, k_, v_)
        else:
            o, vjp = jax.vjp(attn, q_, k_, v_, g_)
        # o is returned too: a training step needs it, as FLA's timed call computes it (with
        # the gradients alone XLA would drop the forward's output kernel).
        return o, vjp(do_)

    return jax.jit(attn), fwd_bwd


def bench_jax(impl, q, k, v, g, do, scale, config=None, learned=None):
    fwd, fwd_bwd = jax_calls(impl, q.shape, scale, config, learned)
    t_f = time_calls(lambda: fwd(q, k, v, g), jax_sync)
    t_fb = time_calls(lambda: fwd_bwd(q, k, v, g, do), jax_sync)
    return t_f, t_fb


def bench_fla(form, qn, kn, vn, gn, don, scale):
    import torch

    dev = "cuda"
    def t(x, dt=torch.bfloat16):
        return torch.tensor(x, dtype=torch.float32, device=dev).to(dt)
    q, k, v, do = t(qn), t(kn), t(vn), t(don)
    if form == "basic":
        from fla.ops.linear_attn import chunk_linear_attn
        def call(q_, k_, v_):
            return chunk_linear_attn(q_, k_, v_, scale=scale, normalize=False)[0]
    elif form == "lightning":
        from fla.ops.simple_gla import chunk_simple_gla
        gg = torch.tensor(gn, dtype=torch.float32, device=dev)
        def call(q_, k_, v_):
            return chunk_simple_gla(q_, k_, v_, g_gamma=gg, scale=scale)[0]
    elif form == "simple_gla":
        from fla.ops.simple_gla import chunk_simple_gla
        gg = torch.tensor(gn, dtype=torch.float32, device=dev)
        def call(q_, k_, v_):
            return chunk_simple_gla(q_, k_, v_, g=gg, scale=scale)[0]
    else:
        from fla.ops.gla import chunk_gla
        gg = torch.tensor(gn, dtype=torch.float32, device=dev)
        def call(q_, k_, v_):
            return chunk_gla(q_, k_, v_, g=gg, scale=scale)[0]
    def sync(_):
        return torch.cuda.synchronize()

    def fwd():
        with torch.no_grad():
            return call(q, k, v)

    qg, kg, vg = (x.clone().requires_grad_(True) for x in (q, k, v))

    def fwd_bwd():
        o = call(qg, kg, vg)
        o.backward(do)
        return o

    t_fwd = time_calls(fwd, sync)
    try:
        return t_fwd, time_calls(fwd_bwd, sync), None
    except Exception as e:  # FLA's gated backward refuses Triton < 3.7.1 on Hopper
        return t_fwd, float("nan"), f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"


def copy_bandwidth():
    x = jnp.ones((1024, 1024, 256), jnp.float32)  # 1 GiB
    f = jax.jit(lambda a: a * 1.0001)
    ms = time_calls(lambda: f(x), jax_sync)
    return 2 * x.size * 4 / (ms * 1e-3) / 1e9  # GB/s, read + write


def flops(B, T, H, D, C=64):
    fwd = 2.0 * B * H * T * (C * D + C * D + 2 * D * D)
    return fwd, 3 * fwd


def hbm_bytes(B, T, H, D, form):
    x = B * T * H * D * 2  # one bf16 tensor
    gb = {"basic": 0, "lightning": 0, "simple_gla": B * T * H * 4, "gla": B * T * H * D * 4}[form]
    fwd = 4 * x + gb  # q, k, v in; o out
    return fwd, fwd + 4 * x + gb  # + do in; dq, dk, dv out (+ dg)


def run_timings(out, shapes, impls, forms, variants, save=lambda: None, doc_len: int = 0):
    rng = np.random.default_rng()
    H, D = 16, 128
    bw = copy_bandwidth()
    out["copy_GBps"] = bw
    log(f"device copy bandwidth {bw:.0f} GB/s")
    rows = []
    for B, T in shapes:
        qn, kn = (rng.standard_normal((B, T, H, D)).astype(np.float32) for _ in range(2))
        vn, don = (rng.standard_normal((B, T, H, D)).astype(np.float32) for _ in range(2))
        q, k, v, do = (jnp.asarray(x, jnp.bfloat16) for x in (qn, kn, vn, don))
        scale = D ** -0.5
        f_fwd, f_fb = flops(B, T, H, D)
        for form in forms:
            gn = make_decay(rng, form, B, T, H, D, doc_len)
            g = None if gn is None else jnp.asarray(gn)
            b_fwd, b_fb = hbm_bytes(B, T, H, D, form)
            cases = [(impl, None) for impl in impls]
            if (B, T) == shapes[0]:  # the variants at the first shape, for each form asked
                cases += [("pallas", v_) for v_ in variants]
            for impl, variant in cases:
                name = impl if variant is None else f"pallas[{variant}]"
                try:
                    err = None
                    if impl == "fla":
                        t_f, t_fb, err = bench_fla(form, qn, kn, vn, gn, don, scale)
                    else:
                        cfg = VARIANTS.get(variant)
                        with switched(variant):
                            try:
                                t_f, t_fb = bench_jax(impl, q, k, v, g, do, scale, cfg,
                                                      form in LEARNED_DECAY)
                            except Exception:
                                if impl != "pallas" or not pallas_forward.FAST_PATH_MODES:
                                    raise
                                traceback.print_exc(limit=3)
                                pallas_forward.FAST_PATH_MODES = frozenset()
                                jax.clear_caches()  # traced anew without the fast path
                                name += "(exact)"
                                t_f, t_fb = bench_jax(impl, q, k, v, g, do, scale, cfg,
                                                      form in LEARNED_DECAY)
                except Exception as e:  # a kernel that does not run here is a result too
                    t_f = t_fb = float("nan")
                    err = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    traceback.print_exc(limit=2)
                row = dict(B=B, T=T, H=H, D=D, form=form, impl=name, doc_len=doc_len,
                           fwd_ms=t_f, fwd_bwd_ms=t_fb,
                           fwd_tflops=f_fwd / (t_f * 1e-3) / 1e12,
                           fwd_bwd_tflops=f_fb / (t_fb * 1e-3) / 1e12,
                           fwd_GBps=b_fwd / (t_f * 1e-3) / 1e9,
                           fwd_floor_ms=b_fwd / (bw * 1e9) * 1e3,
                           fwd_bwd_floor_ms=b_fb / (bw * 1e9) * 1e3, error=err)
                rows.append(row)
                out["timings"] = rows
                save()
                log(f"B={B} T={T:6d} {form:10s} {name:28s} fwd {t_f:8.3f} ms  "
                    f"fwd+bwd {t_fb:8.3f} ms" + (f"  [{err}]" if err else ""))
    out["timings"] = rows
    return rows


def _variants():
    fb = pallas.pallas_forward.BlockSizes
    bb = pallas.pallas_backward.BlockSizes
    C = pallas.Config
    return {
        "prog264": C(fb(min_programs=264), bb()),
        "prog64": C(fb(min_programs=64), bb()),
        "w8": C(fb(num_warps=8), bb(num_warps=8)),
        "bv128": C(fb(block_v=128, num_warps=8), bb(block_k=128, block_v=128, num_warps=8)),
        "st3": C(fb(num_stages=3), bb(num_stages=3)),
        "st1": C(fb(num_stages=1), bb(num_stages=1)),
        "bw8": C(fb(), bb(num_warps=8)),
        "fw8": C(fb(num_warps=8), bb()),
        "bk32": C(fb(), bb(block_k=32)),
        "bst3": C(fb(), bb(num_stages=3)),
        # the backward's dq and dk kernels on all of Dk at once: dO V^T once per chunk, not
        # once per Dk block
        "bbk128": C(fb(), bb(block_k=128, num_warps=8)),
    }


VARIANTS = _variants()

# Variants that set module switches, read when the kernels are traced, instead of a Config.
# "difference_nosplit" (the scalar difference form with no operand split) is for timing only:
# without the split its decay gradient fails the bf16 bar (benchmarks/NOTES_kernels.md).
# "difference" is the scalar decay's default before the anchored form; "anchor1", "anchor2" and
# "anchor8" the anchored form with groups of 1, 2 and 8 chunks (default: DG_ANCHOR_CHUNKS).
SWITCHES = {
    "crossing": {"CROSSING_DG_MODES": frozenset({pallas_forward.SCALAR})},
    "dvsummary": {"SUMMARY_ROW_BLOCKS": False},
    "difference": {"ANCHORED_DG_MODES": frozenset()},
    "difference_nosplit": {"ANCHORED_DG_MODES": frozenset(), "SCALAR_DG_SPLIT": frozenset()},
    "anchor1": {"DG_ANCHOR_CHUNKS": 1},
    "anchor2": {"DG_ANCHOR_CHUNKS": 2},
    "anchor8": {"DG_ANCHOR_CHUNKS": 8},
    # GLA's prescaled kernels with the decay gradient summed from the end (v10's form)
    "gla_difference": {"pallas_prescaled.ANCHORED_DG": False},
    # the anchored form's products q . dq and k . dk (pallas_forward.DG_DIRECT_PRODUCTS)
    "dg_operands": {"DG_DIRECT_PRODUCTS": False},
    "dg_direct": {"DG_DIRECT_PRODUCTS": True},
    # timing only: the scalar forms' kernels with the factorised chunk loop alone (right on
    # the benchmarks' inputs, which every segment factorises; pallas_forward.ONE_LOOP)
    "one_loop": {"ONE_LOOP": "factorised"},
    # timing only, wrong results: what a scalar decay's arithmetic costs the kernels, its pair
    # weights replaced by the causal mask, or its q, k and chunk factors by ones
    "no_pair_weights": {"pair_weights": lambda *a, **k: _causal_weights(*a, **k),
                        "pallas_backward.pair_weights": lambda *a, **k: _causal_weights(*a, **k)},
    "no_decay_factors": {"scalar_factors": lambda *a, **k: _unit_factors(*a, **k)},
    # timing only, wrong results: what parts of GLA's prescaled backward cost, the dk kernel's
    # decay-gradient sums without their scan inside the chunk, or without the read of q dq
    "gla_no_dg_scan": {"pallas_prescaled._anchored_sums_from_end":
                       lambda *a: _gla_sums_ablated(*a, scan=False)},
    "gla_no_dbq": {"pallas_prescaled._anchored_sums_from_end":
                   lambda *a: _gla_sums_ablated(*a, read_dbq=False)},
}


def _gla_sums_ablated(db_ref, dbq_ref, sl, k_dk, after, state, dh, group_end, *,
                      scan=True, read_dbq=True):
    """pallas_prescaled._anchored_sums_from_end without its scan or its read of q dq (the
    gla_no_dg_scan and gla_no_dbq ablations)."""
    at_end = jnp.sum(state.astype(jnp.float32) * dh, axis=1)
    after = jnp.where(group_end, at_end, after)
    x = (dbq_ref[sl, :] - k_dk) if read_dbq else -k_dk
    total = jnp.sum(x, axis=0)
    db_ref[sl, :] = (after + total)[None, :] - ((jnp.cumsum(x, axis=0) - x) if scan else x)
    return after + total


def _causal_weights(bf_ref, cnt_ref, sl, c, factorised=False):
    """pallas_forward.pair_weights without the decay (the no_pair_weights ablation)."""
    return jnp.where(pallas_forward.causal_mask(c), 1.0, 0.0)


def _unit_factors(bf_ref, cnt_ref, sl, factorised=False):
    """pallas_forward.scalar_factors without the decay (the no_decay_factors ablation)."""
    one = jnp.ones((sl.size, 1), jnp.float32)
    return one, one, 1.0


def _switch_target(name):
    """(module, attribute) of a switch: pallas_forward's, or "module.ATTR" of lasp2_jax.kernels."""
    module, _, attr = name.rpartition(".")
    return (getattr(pallas, module) if module else pallas_forward), attr


def switch_changes(variant) -> dict:
    """The switches a variant sets: one of SWITCHES, or several joined by "+" ({} for a
    Config variant, None or ""). Raises KeyError for an unknown name among several."""
    if not variant or variant in VARIANTS:
        return {}
    changes = {}
    for name in variant.split("+"):
        changes.update(SWITCHES[name])
    return changes


def is_switch_variant(variant) -> bool:
    return bool(variant) and all(n in SWITCHES for n in variant.split("+"))


def set_switches(variant):
    """Set the kernel modules' switches as the variant says (none for a Config variant or
    None) and return their previous values. Kernels already traced keep the old setting: call
    before the first trace, or use :func:`switched`."""
    changes = switch_changes(variant)
    saved = {n: getattr(*_switch_target(n)) for n in changes}
    for n, value in changes.items():
        setattr(*_switch_target(n), value)
    return saved


@contextlib.contextmanager
def switched(variant):
    """pallas_forward's switches as the variant sets them, restored afterwards. The jit caches
    are cleared on both sides: inner jitted functions would otherwise keep the kernels traced
    under the other setting."""
    saved = set_switches(variant)
    if saved:
        jax.clear_caches()
    try:
        yield
    finally:
        for n, value in saved.items():
            setattr(*_switch_target(n), value)
        if saved:
            jax.clear_caches()


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    groups = sorted({(r["B"], r["T"]) for r in rows})
    impls = [i for i in ("pallas", "xla", "fla") if any(r["impl"] == i for r in rows)]
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 3.2 * len(groups)), squeeze=False)
    for gi, (B, T) in enumerate(groups):
        for ci, key in enumerate(("fwd_ms", "fwd_bwd_ms")):
            ax = axes[gi][ci]
            for ii, impl in enumerate(impls):
                vals = [next((r[key] for r in rows if r["B"] == B and r["T"] == T and
                              r["form"] == f and r["impl"] == impl), np.nan) for f in FORMS]
                ax.bar(np.arange(len(FORMS)) + ii * 0.27, vals, 0.27, label=impl)
            ax.set_xticks(np.arange(len(FORMS)) + 0.27 * (len(impls) - 1) / 2)
            ax.set_xticklabels(FORMS)
            ax.set_ylabel("ms")
            ax.set_title(f"{key[:-3]}  B={B} T={T} H=16 D=128 bf16")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--quick-check", action="store_true")
    p.add_argument("--check-only", action="store_true", help="the oracle checks, no timings")
    p.add_argument("--check-last", action="store_true", help="time first, then check")
    p.add_argument("--check-forms", default=",".join(CHECK_FORMS),
                   help="the decay forms of the oracle checks")
    p.add_argument("--check-dtypes", default="bfloat16,float32",
                   help="the input dtypes of the oracle checks")
    p.add_argument("--check-cases", default=",".join(CHECK_CASES),
                   help="the shapes of the oracle checks: " + ", ".join(CHECK_CASES))
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the oracle checks' random inputs (default: fresh ones)")
    p.add_argument("--impls", default="pallas,xla,fla")
    p.add_argument("--forms", default=",".join(FORMS))
    p.add_argument("--variants", default="",
                   help="comma list of " + ", ".join([*VARIANTS, *SWITCHES])
                   + " (switches combine with +, as dg_direct+anchor8)")
    p.add_argument("--shapes", default="1x16384,4x16384,1x65536", help="BxT,... (--quick: first)")
    p.add_argument("--dg-split", default=None,
                   help="override the operands split for a difference-form decay gradient "
                        "(pallas_forward.DG_SPLIT and SCALAR_DG_SPLIT): comma list, or 'none'")
    p.add_argument("--crossing-dg", action="store_true",
                   help="the scalar decay's gradient summed over crossing pairs, no split "
                        "(default: q dq - k dk, the states split)")
    p.add_argument("--exact-per-dim", action="store_true",
                   help="the per-dimension decay on the exact kernels only (default: the "
                        "prescaled kernels where every chunk allows them)")
    p.add_argument("--doc-len", type=int, default=0,
                   help="time packed documents of this mean length (resets in the decay, as "
                        "in training; default 0: one document)")
    p.add_argument("--tag", default="kernels")
    p.add_argument("--out", default=RESULTS, help="folder for the JSON and PNG")
    args = p.parse_args()
    dev = jax.devices()[0]
    out = dict(device=dev.device_kind, jax=jax.__version__, platform=dev.platform)
    if args.dg_split is not None:
        split = [] if args.dg_split == "none" else args.dg_split.split(",")
        pallas_forward.DG_SPLIT = pallas_forward.SCALAR_DG_SPLIT = frozenset(split)
    if args.crossing_dg:
        set_switches("crossing")
    if args.exact_per_dim:
        pallas.PRESCALED_PER_DIM = False
    out["prescaled_per_dim"] = pallas.PRESCALED_PER_DIM
    out["dg_split"] = sorted(pallas_forward.DG_SPLIT)
    out["scalar_dg_split"] = sorted(pallas_forward.SCALAR_DG_SPLIT)
    out["crossing_dg_modes"] = sorted(pallas_forward.CROSSING_DG_MODES)
    out["anchored_dg_modes"] = sorted(pallas_forward.ANCHORED_DG_MODES)
    out["dg_anchor_chunks"] = pallas_forward.DG_ANCHOR_CHUNKS
    log(f"DG_SPLIT = {out['dg_split']}, SCALAR_DG_SPLIT = {out['scalar_dg_split']}, "
        f"CROSSING_DG_MODES = {out['crossing_dg_modes']}, ANCHORED_DG_MODES = "
        f"{out['anchored_dg_modes']} in groups of {out['dg_anchor_chunks']} chunks")
    log(f"device {dev.device_kind}  jax {jax.__version__}")
    os.makedirs(args.out, exist_ok=True)
    jpath = os.path.join(args.out, f"{args.tag}.json")

    def save():  # after every case, so a run cut short keeps what it measured
        with open(jpath, "w") as f:
            json.dump(out, f, indent=1)

    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS and not is_switch_variant(v)]
    if unknown:
        p.error(f"unknown variants {unknown}")

    def checks():  # the defaults, then each switch variant (a Config changes no result)
        ok = True
        for variant in ["", *(v for v in variants if is_switch_variant(v))]:
            with switched(variant):
                ok &= run_checks(out, args.quick_check, args.check_forms.split(","),
                                 args.check_cases.split(","), save,
                                 args.check_dtypes.split(","), variant, args.seed)
        return ok

    ok = True
    if not args.no_check and not args.check_last:
        ok = checks()
        save()
    if args.check_only:
        log("checks:", "all OK" if ok else "FAILURES")
        return
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    shapes = shapes[:1] if args.quick else shapes
    if args.doc_len and "fla" in args.impls.split(","):
        p.error("--doc-len times this project's kernels only (FLA takes documents as cu_seqlens)")
    out["doc_len"] = args.doc_len
    rows = run_timings(out, shapes, args.impls.split(","), args.forms.split(","), variants,
                       save, args.doc_len)
    if not args.no_check and args.check_last:
        ok = checks()
    save()
    ppath = os.path.join(args.out, f"{args.tag}.png")
    plot([r for r in rows if "[" not in r["impl"]], ppath)
    log(f"\n{dev.device_kind}, jax {jax.__version__}, bf16 H=16 D=128 (median ms)")
    log(f"{'B':>2} {'T':>6} {'form':10s} {'impl':22s} {'fwd':>8} {'fwd+bwd':>8} "
        f"{'TF/s':>6} {'floor':>6}")
    for r in rows:
        log(f"{r['B']:2d} {r['T']:6d} {r['form']:10s} {r['impl']:22s} {r['fwd_ms']:8.3f} "
            f"{r['fwd_bwd_ms']:8.3f} {r['fwd_bwd_tflops']:6.0f} {r['fwd_bwd_floor_ms']:6.3f}")
    log("checks:", "all OK" if ok else "FAILURES")


if __name__ == "__main__":
    main()
