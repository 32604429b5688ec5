"""Time each stage of the pallas backend separately (B=1, T=16384, H=16, D=128, bf16).

    python benchmarks/profile_kernels.py [--modes none,scalar,per_dim]

Stages: the decay tables (jnp), the forward summary, the output kernel, the backward summary,
the dq / dk / dv kernels, and the whole forward / forward+backward for comparison.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.bench_kernels import jax_sync, time_calls  # noqa: E402
from lasp2_jax.kernels import pallas, pallas_backward, pallas_forward  # noqa: E402


def profile(mode, B=1, T=16384, H=16, D=128, config=pallas.DEFAULT_CONFIG):
    rng = np.random.default_rng()
    q, k, v, do = (jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.bfloat16) for _ in range(4))
    g = None
    if mode == "scalar":
        g = jnp.asarray(np.log(rng.uniform(0.9, 1, (B, T, H))), jnp.float32)
    elif mode == "per_dim":
        g = jnp.asarray(np.log(rng.uniform(0.9, 1, (B, T, H, D))), jnp.float32)
    pmode = pallas._mode(g)
    plan = pallas._plan(B, T, H, D, D, pmode, 64, config)
    s0 = jnp.zeros((B, H, D, D), jnp.float32)
    scale = D ** -0.5
    res = {}
    prep = jax.jit(lambda q, k, v, g, s0: pallas._prepare(q, k, v, g, s0, plan))
    res["prep"] = time_calls(lambda: prep(q, k, v, g, s0), jax_sync)
    q_, k_, v_, bf, cnt, a, s0_ = prep(q, k, v, g, s0)
    S = plan.segments
    summ = jax.jit(lambda x, y, bf, cnt: pallas_forward.segment_summary(
        x, y, bf, cnt, mode=pmode, num_segments=S, heads=H, block_sizes=plan.fwd,
        reverse=False, side="k", scale=1.0))
    res["summary"] = time_calls(lambda: summ(k_, v_, bf, cnt), jax_sync)
    m = summ(k_, v_, bf, cnt)
    outs = jax.jit(lambda q, k, v, bf, cnt, s0, m, a: pallas_forward.forward_outputs(
        q, k, v, bf, cnt, s0, m, a, mode=pmode, scale=scale, block_sizes=plan.fwd,
        out_dtype=q.dtype))
    res["outputs"] = time_calls(lambda: outs(q_, k_, v_, bf, cnt, s0_, m, a), jax_sync)
    bsumm = jax.jit(lambda x, y, bf, cnt: pallas_forward.segment_summary(
        x, y, bf, cnt, mode=pmode, num_segments=S, heads=H, block_sizes=plan.fwd,
        reverse=True, side="q", scale=scale))
    res["bwd_summary"] = time_calls(lambda: bsumm(q_, do, bf, cnt), jax_sync)
    dm = bsumm(q_, do, bf, cnt)
    for part in ("dq", "dk", "dv"):
        f = jax.jit(lambda q, k, v, do, bf, cnt, s0, m, dm, a, part=part: pallas_backward.backward(
            q, k, v, do, bf, cnt, s0, m, s0, dm, a, mode=pmode, scale=scale, chunk=plan.chunk,
            block_sizes=plan.bwd, dim_slice=plan.fwd.dim_slice, parts=(part,)))
        res[part] = time_calls(lambda f=f: f(q_, k_, v_, do, bf, cnt, s0_, m, dm, a), jax_sync)

    def attn(q, k, v, g):
        return pallas.chunk_linear_attention(q, k, v, g, scale=scale, config=config)[0]

    fwd = jax.jit(attn)
    fb = jax.jit(lambda q, k, v, g, do: jax.vjp(attn, q, k, v, g)[1](do))
    res["fwd_total"] = time_calls(lambda: fwd(q, k, v, g), jax_sync)
    res["fwd_bwd_total"] = time_calls(lambda: fb(q, k, v, g, do), jax_sync)
    parts = sum(res[p] for p in ("prep", "summary", "outputs", "bwd_summary", "dq", "dk", "dv"))
    res["glue"] = res["fwd_bwd_total"] - parts
    return plan, res


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--modes", default="none,scalar,per_dim")
    args = p.parse_args()
    print(f"device {jax.devices()[0].device_kind}  jax {jax.__version__}", flush=True)
    for mode in args.modes.split(","):
        plan, res = profile(mode)
        print(f"{mode:8s} C={plan.chunk} S={plan.segments} " +
              "  ".join(f"{k}={v:.3f}" for k, v in res.items()), flush=True)


if __name__ == "__main__":
    main()
