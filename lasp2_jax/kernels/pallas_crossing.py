"""The crossing form of a learned scalar decay's gradient (pallas_backward's module docstring):
the per-chunk sums that the dq and dk kernels call in each step of their chunk loops.

dg_u sums the pair terms P_ts = scale * exp(b_t - b_s) (q_t . k_s) (dO_t . v_s) over every
pair s < u <= t that crosses position u. Cut by chunks, the pairs crossing a position u of
chunk c are
- inside: s and t both in chunk c, and entering: s before chunk c, t in it at or after u
  (``inside_and_entering_sums``, dq kernel, which holds the state S entering the chunk);
- leaving: s in chunk c before u, t after the chunk, and passing: s before chunk c, t after it
  (``leaving_and_passing_sums``, dk kernel, which holds the cotangent dS' of the state leaving
  the chunk; the passing term reads S back from where the dq kernel stored it).

Measured on an H100 (benchmarks/NOTES_kernels.md, v7): these sums take 0.14 ms of the dq
kernel and 0.09 ms of the dk kernel at B=1 T=16K H=16 D=128. The inside pairs need no state,
but a kernel of their own, with the chunks in parallel, made the backward slower (it took
0.10 ms and saved dq 0.05 ms); the dq sums as row sums of one matmul changed nothing.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from lasp2_jax.kernels.pallas_forward import causal_mask, mm

_f32 = jnp.float32


def strictly_before(c: int):
    """[C, C] mask [s, u] = (s < u)."""
    return (lax.broadcasted_iota(jnp.int32, (c, c), 0)
            < lax.broadcasted_iota(jnp.int32, (c, c), 1))


def inside_and_entering_sums(q, k, wdp, dq_inter, c: int):
    """dq side, for each position u of the chunk ([C], partial over the program's Dk block):
    the pairs s < u <= t inside the chunk plus those from earlier chunks into t >= u.

    q, k: [C, bk]; wdp: [C, C] dP * W indexed [t, s], as it entered the dq product (a matmul
    operand); dq_inter: [C, bk] float32, the state's part of dq.

    (Transposing ``before`` so that the sum over t runs along rows, with the entering term as
    a 1-D scan, measured slower on an H100: 0.355 against 0.322 ms for the dq kernel.)"""
    pairs = wdp.astype(_f32) * mm(q, k, tb=True)  # [t, s]
    # before[t, u] = sum over s < u of pairs[t, s]: a matmul with the strictly-lower ones
    before = mm(pairs.astype(q.dtype), strictly_before(c).astype(q.dtype))
    entering = jnp.sum(q.astype(_f32) * dq_inter, axis=1, keepdims=True)  # [t, 1]
    return jnp.sum(jnp.where(causal_mask(c), before + entering, 0.0), axis=0)  # over t >= u


def leaving_and_passing_sums(k, dk_inter, s_in, dh, fa):
    """dk side ([C], partial over the Dk block): the pairs from s < u of the chunk to later
    chunks, sum_{s < u} k_s . dk_inter_s, plus those passing over the chunk, fa <S_in, dS'>
    (the same for every u).

    k: [C, bk]; dk_inter: [C, bk] float32, the state's part of dk; s_in: [bk, Dv] the state
    entering the chunk (as the dq kernel stored it); dh: [bk, Dv] the cotangent of the state
    leaving it; fa: the chunk's decay factor."""
    leaving = jnp.sum(k.astype(_f32) * dk_inter, axis=1)  # [s]
    passing = fa * jnp.sum(s_in.astype(_f32) * dh)
    # The sum over s < u as an exclusive 1-D scan: on an H100 this took the dk kernel from
    # 0.237 to 0.225 ms against a masked [C, C] tile summed down its columns (across warps).
    return jnp.cumsum(leaving) - leaving + passing
