"""The incoming state's term of the outputs, added after the attention ran from a zero state.

LASP-2 overlaps its all-gather of the rank summaries with the local attention by running that
attention from a zero state and adding the incoming state S's contribution once the gather has
arrived (DESIGN.md §1):

    o_t = o_zero_t + scale * (exp(b_t) * q_t) S,   b_t = sum_{s <= t} g_s over the local tokens,

with exp(b_t) = 0 from a token's first reset on. One program per (batch * head, block of
chunks, Dv block) reads the chunks' q (or GLA's prescaled qe), o_zero and the factors, and
writes o: one pass over the tokens, in parallel over blocks of chunks. The factors come from
the tables the attention built anyway (:func:`scalar_factors`, :func:`per_dim_factors`).

On an H100 at B=1 T=16K H=16 D=128 bf16 (`python benchmarks/bench_state_entry.py`,
benchmarks/results/state_entry_H100.json) the term took 0.267 ms as XLA fusions (an einsum of
the decayed q with S, then the sum in float32), and 0.095 ms here (0.74 of the pass's HBM
floor) with the whole Dv per program, 4 warps and 8 chunks per program; Dv blocks of 64 took
0.122 ms.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lasp2_jax import compat
from lasp2_jax.kernels import pallas_prescaled, pallas_scans
from lasp2_jax.kernels.pallas_forward import absent_refs, mm, pow2_divisor

_f32 = jnp.float32


def _exclusive_chunk_prefix(log_chunk_decays):
    """exp of the sum of the chunk log decays [B, H, N(, Dk)] before each chunk (axis 2; -inf:
    a reset, after which the prefix is exactly 0). Shifted, not the inclusive sum less the
    chunk's own term, which would be -inf - -inf at a reset."""
    total = jnp.cumsum(log_chunk_decays, axis=2)
    zero = jnp.zeros_like(total[:, :, :1])
    return jnp.exp(jnp.concatenate([zero, total[:, :, :-1]], axis=2))


def scalar_factors(bf, cnt, chunk: int):
    """exp(b_t) over the local tokens [B, H, T] from a scalar decay's chunk-local tables bf,
    cnt [B, H, T] (pallas_forward): the chunk's own factor times the decay of the chunks before
    it, 0 from the first reset on."""
    B, H, T = bf.shape
    n = T // chunk
    log_chunk = jnp.where(pallas_scans.chunk_ends(cnt, chunk) > 0.0, -jnp.inf,
                          pallas_scans.chunk_ends(bf, chunk))  # [B, H, N]
    before = _exclusive_chunk_prefix(log_chunk)
    own = jnp.where(cnt == 0.0, jnp.exp(bf), 0.0).reshape(B, H, n, chunk)
    return (own * before[..., None]).reshape(B, H, T)


def per_dim_factors(ad, cnt):
    """GLA's prescaled form: the decay of the chunks before each chunk, per key dimension,
    [B, H, N, Dk], from the chunk decays ad [B, H, N, Dk] and the reset counts cnt [B, H, T]
    of pallas_prescaled.prescale (None: no reset in the call). qe times it is exp(b) q up to the
    tokens after a chunk's first reset, which the kernel zeroes from cnt."""
    # log 0 = -inf: a reset
    return _exclusive_chunk_prefix(jnp.log(pallas_prescaled.carried_decays(ad, cnt)))


def _entry_kernel(x_ref, o_ref, s_ref, row_ref, col_ref, cnt_ref, out_ref, *, scale: float,
                  chunk: int, chunks: int):
    state = s_ref[...].astype(x_ref.dtype)  # [Dk, bv], a matmul operand in x's dtype
    for i in range(chunks):
        sl = pl.ds(i * chunk, chunk)
        x = x_ref[sl, :]  # [C, Dk]: q, or GLA's prescaled qe
        if col_ref is not None:  # [1, Dk]: the decay of the chunks before, per key dimension
            x = (x.astype(_f32) * col_ref[pl.ds(i, 1), :]).astype(x.dtype)
        term = mm(x, state)  # [C, bv]
        if row_ref is not None:  # [C]: exp(b_t), a scalar decay
            term = term * row_ref[sl][:, None]
        if cnt_ref is not None:  # the state reaches the tokens before the chunk's first reset
            term = jnp.where((cnt_ref[sl] == 0.0)[:, None], term, 0.0)
        out_ref[sl, :] = (o_ref[sl, :].astype(_f32) + scale * term).astype(out_ref.dtype)


def add_state_term(o_zero, x, s, *, scale: float, chunk: int, rows=None, cols=None, cnt=None,
                   block_v: int = 128, num_warps: int = 4, chunks_per_program: int = 8):
    """o_zero + scale * (decayed x) s, [B, T, H, Dv] in o_zero's dtype.

    o_zero [B, T, H, Dv]; x [B, T, H, Dk] (q, or GLA's qe); s [B, H, Dk, Dv] float32, the
    incoming state; T a multiple of chunk. The decay of x: rows [B, H, T], a per-token factor
    (:func:`scalar_factors`); or cols [B, H, T // chunk, Dk], per chunk and key dimension
    (:func:`per_dim_factors`) with cnt [B, H, T], the reset counts, where the call has resets;
    all None without decay. A program takes up to chunks_per_program chunks and reads its
    [Dk, block_v] block of s once for them (with 8 warps one chunk was as fast, module
    docstring).
    """
    B, T, H, dk = x.shape
    dv = o_zero.shape[-1]
    bv = min(block_v, dv)
    n = T // chunk
    g = pow2_divisor(n, chunks_per_program)  # chunks per program
    span = g * chunk
    rows_of_x = pl.BlockSpec((None, span, None, dk), lambda bh, i, j: (bh // H, i, bh % H, 0))
    vcol = pl.BlockSpec((None, span, None, bv), lambda bh, i, j: (bh // H, i, bh % H, j))
    token = pl.BlockSpec((None, None, span), lambda bh, i, j: (bh // H, bh % H, i))
    optional = [(rows, token),
                (cols, pl.BlockSpec((None, None, g, dk), lambda bh, i, j: (bh // H, bh % H, i, 0))),
                (cnt, token)]
    kernel = functools.partial(_entry_kernel, scale=scale, chunk=chunk, chunks=g)
    # The refs of absent factors are None (absent_refs, from the last one back).
    for position in (5, 4, 3):
        if optional[position - 3][0] is None:
            kernel = absent_refs(kernel, 1, position=position)
    given = [(arr, spec) for arr, spec in optional if arr is not None]
    return pl.pallas_call(
        kernel,
        grid=(B * H, n // g, dv // bv),
        in_specs=[rows_of_x, vcol,
                  pl.BlockSpec((None, None, dk, bv), lambda bh, i, j: (bh // H, bh % H, 0, j)),
                  *(spec for _, spec in given)],
        out_specs=vcol,
        out_shape=jax.ShapeDtypeStruct(o_zero.shape, o_zero.dtype),
        compiler_params=compat.triton_compiler_params(num_warps=num_warps, num_stages=1),
        interpret=compat.pallas_interpret(),
        name="lasp2_state_entry",
    )(x, o_zero, s, *(arr for arr, _ in given))
