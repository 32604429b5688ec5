"""The cumulative sums around the linear-attention kernels, as Pallas kernels.

- ``decay_tables``: the chunk-local decay tables (bf, cnt) of pallas_forward. One program per
  (batch, chunk, head) reads the chunk's log decays once and writes bf, the inclusive
  cumulative sum of the finite log decays from the chunk start, and cnt, the number of resets
  (g < RESET_LOG_DECAY) from the chunk start.
- ``reverse_decay_sums``: a per-dimension decay's gradient dg_t = sum_{s >= t} (q dq - k dk)_s
  from the two halves the dq and dk kernels emit.

As XLA fusions these cumulative sums re-read their window for every output: at B=1 T=16K H=16
Dk=128 on an H100 the two tables took 0.37 ms and the reverse sum 0.63 ms
(benchmarks/NOTES_kernels.md). Here each input is read once and each output written once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lasp2_jax import compat

_f32 = jnp.float32

# exp(g) is exactly 0 in float32 below this: such a token is a state reset.
RESET_LOG_DECAY = -104.0


def without_resets(g):
    """The log decays g with each reset (below RESET_LOG_DECAY) replaced by 0: the terms of
    the chunk-local sums, which leave resets to the reset counts."""
    return jnp.where(g < RESET_LOG_DECAY, 0.0, g)


def chunk_ends(table, chunk: int):
    """[B, H, T // chunk]: a head-major table [B, H, T] (bf, cnt) at each chunk's last token,
    where it holds the chunk's total."""
    return table[:, :, chunk - 1::chunk]


def _tables_kernel(g_ref, bf_ref, cnt_ref):
    g = g_ref[...]  # [C] or [C, Dk]
    bf_ref[...] = jnp.cumsum(without_resets(g), axis=0)
    cnt_ref[...] = jnp.cumsum((g < RESET_LOG_DECAY).astype(_f32), axis=0)


def decay_tables(g, chunk: int):
    """bf, cnt of the log decays g, chunk by chunk.

    g: [B, T, H] (scalar decay) or [B, T, H, Dk] (per dimension), float32, T a multiple of
    chunk. Returns bf, cnt float32: [B, H, T] for a scalar decay (head-major, the layout of the
    kernels' scalar decay operands), [B, T, H, Dk] per dimension.
    """
    B, T, H = g.shape[:3]
    grid = (B, T // chunk, H)
    if g.ndim == 3:
        in_spec = pl.BlockSpec((None, chunk, None), lambda b, n, h: (b, n, h))
        out_spec = pl.BlockSpec((None, None, chunk), lambda b, n, h: (b, h, n))
        out_shape = jax.ShapeDtypeStruct((B, H, T), _f32)
    else:
        dk = g.shape[3]
        in_spec = pl.BlockSpec((None, chunk, None, dk), lambda b, n, h: (b, n, h, 0))
        out_spec = in_spec
        out_shape = jax.ShapeDtypeStruct(g.shape, _f32)
    return pl.pallas_call(
        _tables_kernel,
        grid=grid,
        in_specs=[in_spec],
        out_specs=[out_spec, out_spec],
        out_shape=[out_shape, out_shape],
        compiler_params=compat.triton_compiler_params(num_warps=4, num_stages=1),
        interpret=compat.pallas_interpret(),
        name="lasp2_decay_tables",
    )(g)


def _reverse_sums_kernel(dbq_ref, dbk_ref, end_ref, after_ref, dg_ref):
    x = dbq_ref[...] - dbk_ref[...]  # [C, Dk]
    c = x.shape[0]
    # The final state's term enters at the sequence's last token, before any sum: there it
    # nearly cancels k dk (see pallas.py). end_ref holds it for the last chunk, zeros for the
    # others. (Not a test of program_id against num_programs: on the GPU, a kernel compiled
    # for one grid and then launched for another in the same process read the first grid's
    # num_programs, benchmarks/check_reverse_sums.py.)
    last_row = lax.broadcasted_iota(jnp.int32, x.shape, 0) == c - 1
    x = x + jnp.where(last_row, end_ref[...][None, :], 0.0)
    # sum_{s >= t} x_s = (chunk total) - (sum_{s < t} x_s): a forward scan, which Triton has.
    dg_ref[...] = (jnp.sum(x, axis=0)[None, :] - jnp.cumsum(x, axis=0) + x
                   + after_ref[...][None, :])


def reverse_decay_sums(dbq, dbk, final_term, chunk: int):
    """dg_t = sum_{s >= t} (dbq_s - dbk_s), with final_term added at the last token.

    dbq, dbk: [B, T, H, Dk] float32, T a multiple of chunk; final_term [B, H, Dk]. The chunks
    after each chunk enter as one total each, summed by XLA over the T / chunk chunk totals.
    Returns dg [B, T, H, Dk] float32.
    """
    B, T, H, dk = dbq.shape
    n = T // chunk
    totals = jnp.sum((dbq - dbk).reshape(B, n, chunk, H, dk), axis=2)  # [B, N, H, Dk]
    end = jnp.zeros_like(totals).at[:, -1].set(final_term)  # the final term, by chunk
    totals = totals + end
    from_end = jnp.cumsum(jnp.flip(totals, 1), axis=1)
    after = jnp.flip(jnp.concatenate([jnp.zeros_like(from_end[:, :1]), from_end[:, :-1]], 1),
                     1)  # sum over the chunks after each chunk
    spec = pl.BlockSpec((None, chunk, None, dk), lambda b, i, h: (b, i, h, 0))
    return pl.pallas_call(
        _reverse_sums_kernel,
        grid=(B, n, H),
        in_specs=[spec, spec, pl.BlockSpec((None, None, None, dk), lambda b, i, h: (b, i, h, 0)),
                  pl.BlockSpec((None, None, None, dk), lambda b, i, h: (b, i, h, 0))],
        out_specs=spec,
        out_shape=jax.ShapeDtypeStruct(dbq.shape, _f32),
        compiler_params=compat.triton_compiler_params(num_warps=4, num_stages=1),
        interpret=compat.pallas_interpret(),
        name="lasp2_reverse_decay_sums",
    )(dbq, dbk, end, after)
