"""A per-dimension decay (GLA) with the decays folded into the operands before the chunk loops.

With b the chunk-local inclusive cumulative sum of the log decays and b_C its value at the
chunk's end, a chunk of the recurrence S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t is

    o   = scale * ((qe ke^T) * [j <= i]) v + scale * qe S,     S' = diag(ad) S + kd^T v,
    qe  = q * exp(b),   ke = k * exp(-b),   kd = ke * ad,   ad = exp(b_C),

which is basic linear attention plus a per-chunk diagonal decay of the carried state. The
exponentials are taken once, by a kernel that runs over all chunks in parallel
(:func:`prescale`); the chunk loops then do the basic form's matmuls and nothing elementwise
but that diagonal and kd, formed from ke and ad where a loop needs it (:func:`decayed_keys`;
storing kd as well cost every pass one more [T, Dk] operand to read). The exact kernels of
pallas_forward instead take the exponentials inside the sequential chunk loops, on [C, Dk]
tiles, in every program of every pass. On an H100 at B=1 T=16K H=16 D=128 this took GLA's
forward from 0.90 to 0.55 ms and its forward+backward from 2.95 to 1.67 ms, and forming kd in
the loops to 0.42 / 1.56 ms (benchmarks/NOTES_kernels.md, v8 and v9).

The form is exact only where exp(-b) stays finite: every chunk's total log decay must be above
pallas_forward.SAFE_LOG_DECAY in every dimension. pallas.py checks that
(:func:`all_chunks_safe`) and takes the exact kernels otherwise.

Packed documents: a token whose log decay is a reset (below pallas_scans.RESET_LOG_DECAY) in
every key dimension starts a new document. b then sums the other tokens' log decays only, and
cnt, the number of resets in the chunk up to each token, gives the chunk's masks
(:class:`ChunkResets`): scores between tokens of one document (equal counts), the entering
state's terms for the tokens before the first reset, the keys after the last reset in kd, and
no decay of the carried state (0) across a chunk with a reset. A call in which no chunk has a
reset runs kernels compiled without the masks (cnt None). A token that resets only some
dimensions has no such mask: ad is 0 in its chunk, which sends the call to the exact kernels.

Backward, with dqe, dke, dkd the cotangents of the prescaled operands:

    dq = dqe * exp(b),        dk = (dke + ad * dkd) * exp(-b),

with exp(b) the prescale kernel's third output, eb, in the input dtype: the dq and dk kernels
multiply and divide by it instead of reading the float32 log decays and taking their
cumulative sum and exponential again in every chunk step. On an H100 at H=16 D=128 that took
GLA's forward+backward from 1.415 to 1.338 ms at B=1 T=16K and from 5.095 to 4.833 at B=4
(NOTES_kernels.md, v17).

The log-decay gradient is the difference form of pallas_backward (dL/db_t = q_t dq_t -
k_t dk_t), with q dq = qe dqe and k dk = ke dke + kd dkd. Both sides are formed from the very
operands (rounded to the input dtype) that entered the matmuls, so the pair terms that cancel
in the difference are equal numbers on both sides. By default (ANCHORED_DG) it is summed only
inside groups of chunks, from each group's anchor term per key dimension, <S[i, :], dS[i, :]>
of the state leaving the group and its cotangent, as a scalar decay's is (pallas_backward) but
from the group's end, by the dk kernel itself. Otherwise it is summed from the end
(pallas_scans.reverse_decay_sums), and the carried states, the one operand rounded
differently on the two sides, enter their matmuls in two bf16 parts (STATE_SPLIT). On an H100
at B=1 T=16K H=16 D=128 the anchored form took GLA's forward+backward from 1.555 to 1.427 ms
(benchmarks/NOTES_kernels.md, v12). Anchored, the dk kernel takes k dk as ke times the whole
float32 gradient of ke, dke + ad * dkd, where pallas_forward.DG_DIRECT_PRODUCTS is on (the
default, v13): within a group the two sides need not round alike.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lasp2_jax import compat
from lasp2_jax.kernels import pallas_forward, pallas_scans
from lasp2_jax.kernels.pallas_forward import (
    SAFE_LOG_DECAY,
    absent_refs,
    causal_mask,
    chunk_end,
    document_pairs,
    lowp,
    mm,
    mmx,
    segment_entry_state,
    summary_specs,
)
from lasp2_jax.kernels.pallas_scans import RESET_LOG_DECAY, without_resets

_f32 = jnp.float32
# The carried states of the backward enter their matmuls in two bf16 parts when the decay
# gradient is taken over the whole sequence (the operand name of pallas_forward.lowp), that is
# where ANCHORED_DG is off.
STATE_SPLIT = frozenset({"state"})

# The log-decay gradient anchored in groups of chunks, as a scalar decay's (pallas_backward's
# docstring), per key dimension, but from each group's end: the dq kernel stores the state
# leaving each group and writes q dq; the dk kernel, which runs over the chunks in reverse,
# forms each dimension's <S[i, :], dS[i, :]> at a group's end, sums q dq - k dk back to the
# group's start and writes dg itself. No split of the states, no chunk totals over the whole
# sequence, and no k dk array or sums pass (until v13 a pass of its own summed the two
# [B, T, H, Dk] float32 arrays: on an H100 at B=1 T=16K H=16 D=128 GLA's forward+backward took
# 1.417 ms that way, 1.371 now; benchmarks/NOTES_kernels.md, v14). Read when a kernel is
# traced; False: the difference form summed from the end, which segments of an odd number of
# chunks also take (anchor_group would give groups of one).
ANCHORED_DG = True


def anchor_group(n_chunks: int) -> int:
    """Chunks per group of the anchored decay gradient for segments of n_chunks: the largest
    power of two that divides n_chunks, at most pallas_forward.DG_ANCHOR_CHUNKS: a segment's
    last chunk, where the dk kernel starts, must end a group."""
    return pallas_forward.pow2_divisor(n_chunks, pallas_forward.DG_ANCHOR_CHUNKS)


def _params(block_sizes):
    return compat.triton_compiler_params(block_sizes.num_warps, block_sizes.num_stages)


# --------------------------------------------------------------------------------------------
# The operands: one program per (batch, chunk, head), all in parallel.


def _prescale_kernel(q_ref, k_ref, g_ref, qe_ref, ke_ref, eb_ref, ad_ref, cnt_ref):
    g = g_ref[...]  # [C, Dk]
    reset = g < RESET_LOG_DECAY
    gf = without_resets(g)
    b = jnp.cumsum(gf, axis=0)
    eb = jnp.exp(b)
    q, k = q_ref[...].astype(_f32), k_ref[...].astype(_f32)
    qe_ref[...] = (q * eb).astype(qe_ref.dtype)
    ke_ref[...] = (k * jnp.exp(-b)).astype(ke_ref.dtype)
    if eb_ref is not None:
        eb_ref[...] = eb.astype(eb_ref.dtype)
    dims = jnp.sum(reset.astype(_f32), axis=1)  # [C]: the dimensions each token resets
    # A token that resets some dimensions but not all has no [C, C] document mask: ad = 0
    # sends the whole call to the exact kernels (all_chunks_safe).
    mixed = jnp.max(jnp.where((dims > 0.0) & (dims < g.shape[1]), 1.0, 0.0)) > 0.0
    ad_ref[...] = jnp.where(mixed, 0.0, jnp.exp(jnp.sum(gf, axis=0)))
    cnt_ref[...] = jnp.cumsum(jnp.where(dims > 0.0, 1.0, 0.0))


class Prescaled(NamedTuple):
    """The operands of the prescaled kernels (module docstring): qe, ke and eb = exp(b)
    [B, T, H, Dk] in the input dtype (eb, for the backward's dq and dk kernels, None where
    :func:`prescale` was not asked for it), ad [B, H, T // chunk, Dk] float32 and the reset
    counts cnt [B, H, T] float32."""

    qe: jax.Array
    ke: jax.Array
    eb: jax.Array | None
    ad: jax.Array
    cnt: jax.Array


def prescale(q, k, g, chunk: int, with_eb: bool = True) -> Prescaled:
    """:class:`Prescaled` from q, k [B, T, H, Dk] and log decays g [B, T, H, Dk] float32, T a
    multiple of chunk; eb only with_eb (a forward that will not be differentiated spares its
    write, 0.04 ms of GLA's 0.48 at B=1 T=16K H=16 D=128 on an H100). Where a chunk is not
    safe (:func:`all_chunks_safe`) the values are meaningless."""
    B, T, H, dk = q.shape
    n = T // chunk
    spec = pl.BlockSpec((None, chunk, None, dk), lambda b, i, h: (b, i, h, 0))
    n_eb = int(with_eb)
    out = pl.pallas_call(
        absent_refs(_prescale_kernel, 1 - n_eb, position=5),
        grid=(B, n, H),
        in_specs=[spec, spec, spec],
        out_specs=[spec] * (2 + n_eb)
        + [pl.BlockSpec((None, None, None, dk), lambda b, i, h: (b, h, i, 0)),
           pl.BlockSpec((None, None, chunk), lambda b, i, h: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)] * (2 + n_eb)
        + [jax.ShapeDtypeStruct((B, H, n, dk), _f32), jax.ShapeDtypeStruct((B, H, T), _f32)],
        compiler_params=compat.triton_compiler_params(num_warps=4, num_stages=1),
        interpret=compat.pallas_interpret(),
        name="lasp2_prescale",
    )(q, k, g)
    if not n_eb:
        out = (*out[:2], None, *out[2:])
    return Prescaled(*out)


def all_chunks_safe(ad):
    """True where every chunk's total log decay (resets left out) is above SAFE_LOG_DECAY in
    every dimension, so that exp(-b) <= exp(-SAFE_LOG_DECAY), and every reset resets a whole
    token. ad: [B, H, N, Dk] from :func:`prescale`, 0 where a token resets some dimensions
    only."""
    return jnp.all(ad > jnp.exp(jnp.float32(SAFE_LOG_DECAY)))


class ChunkResets(NamedTuple):
    """One chunk's document masks, from the reset counts cnt (:func:`prescale`); without
    resets in the call (no cnt) the masks are left out and the methods change nothing.

    same [C, C]: the causal pairs within one document; q_keep [C, 1]: the tokens before the
    chunk's first reset, the only ones the entering state reaches; k_keep [C, 1]: those after
    its last reset, the only ones that reach the leaving state; carry [1]: whether the chunk
    has no reset, so that the entering state reaches its end.
    """

    same: jax.Array
    q_keep: jax.Array | None = None
    k_keep: jax.Array | None = None
    carry: jax.Array | None = None

    @classmethod
    def load(cls, cnt_ref, sl, c: int):
        if cnt_ref is None:
            return cls(causal_mask(c))
        cnt = cnt_ref[sl]
        last = cnt_ref[chunk_end(sl)]
        return cls(document_pairs(cnt, c), (cnt == 0.0)[:, None], (cnt == last)[:, None],
                   last == 0.0)

    def state_decay(self, ad):
        """[bk, 1]: the chunk's decay of the carried state's rows, from ad [bk]."""
        return (ad if self.carry is None else jnp.where(self.carry, ad, 0.0))[:, None]

    def before_first(self, x):
        """x [C, *] with the rows after the chunk's first reset zeroed."""
        return x if self.q_keep is None else jnp.where(self.q_keep, x, 0.0)

    def after_last(self, x):
        """x [C, *] with the rows before the chunk's last reset zeroed."""
        return x if self.k_keep is None else jnp.where(self.k_keep, x, 0.0)

    def last_keys(self, ke, ad):
        """kd [C, block]: the keys after the chunk's last reset decayed to its end
        (:func:`decayed_keys`), the others 0."""
        return self.after_last(decayed_keys(ke, ad))


def decayed_keys(ke, ad):
    """kd = ke * ad [C, block] in ke's dtype: the keys decayed to their chunk's end, from ke
    [C, block] and the chunk's ad [block]. Every kernel forms it by this same float32 product,
    so the matmuls of all passes (and the decay gradient's k dk) see the same rounded kd."""
    return (ke.astype(_f32) * ad[None, :]).astype(ke.dtype)


def carried_decays(ad, cnt):
    """[B, H, N, Dk]: each chunk's decay of the carried state, its ad [B, H, N, Dk], or 0 for
    a chunk with a reset (cnt [B, H, T] of :func:`prescale` above 0 at its end; None: no
    reset in the call)."""
    if cnt is None:
        return ad
    ends = pallas_scans.chunk_ends(cnt, cnt.shape[2] // ad.shape[2])
    return jnp.where(ends[..., None] > 0.0, 0.0, ad)


def segment_decays(ad, cnt, segments: int):
    """[B, H, S, Dk]: the decay of the carried state over each segment, the product of its
    chunks' :func:`carried_decays`."""
    B, H, n, dk = ad.shape
    return jnp.prod(carried_decays(ad, cnt).reshape(B, H, segments, n // segments, dk), axis=3)


# --------------------------------------------------------------------------------------------
# Forward: the segment summaries, then the outputs from each segment's incoming state.


def _summary_kernel(x_ref, y_ref, ad_ref, cnt_ref, m_ref, *, c: int, n_chunks: int,
                    reverse: bool, scale: float):
    """Forward (x = ke, y = v, chunks in order): M = sum over the segment of its chunks'
    kd^T v, each decayed by the chunks after it. Backward (x = qe, y = dO, in reverse): what the
    segment's outputs send to the state entering it, scale * sum of qe^T dO decayed by the
    chunks before each."""

    def body(i, acc):
        ci = n_chunks - 1 - i if reverse else i
        sl = pl.ds(pl.multiple_of(ci * c, c), c)
        ad, resets = ad_ref[ci, :], ChunkResets.load(cnt_ref, sl, c)
        x = (resets.before_first(x_ref[sl, :]) if reverse
             else resets.last_keys(x_ref[sl, :], ad))
        return resets.state_decay(ad) * acc + scale * mm(x, y_ref[sl, :], ta=True)

    m_ref[...] = lax.fori_loop(0, n_chunks, body, jnp.zeros(m_ref.shape, _f32))


def segment_summaries(x, y, ad, cnt, *, segments: int, chunk: int, block_sizes, reverse: bool,
                      scale: float = 1.0):
    """[B, H, S, Dk, Dv] float32 (see :func:`_summary_kernel`); x [B, T, H, Dk] (ke or qe),
    y [B, T, H, Dv] (v or dO), ad [B, H, T // chunk, Dk] and cnt [B, H, T] (:func:`prescale`;
    None where the call has no reset)."""
    B, T, H, dk = x.shape
    dv = y.shape[-1]
    L = T // segments
    K = L // chunk
    bv = min(block_sizes.block_v, dv)
    counts, count_specs = _counts(cnt, H, L)
    return pl.pallas_call(
        absent_refs(functools.partial(_summary_kernel, c=chunk, n_chunks=K, reverse=reverse,
                                      scale=scale), 1 - len(counts), position=3),
        grid=(B * H, segments, dv // bv),
        in_specs=[pl.BlockSpec((None, L, None, dk), lambda bh, s, j: (bh // H, s, bh % H, 0)),
                  pl.BlockSpec((None, L, None, bv), lambda bh, s, j: (bh // H, s, bh % H, j)),
                  _chunk_decay_spec(H, K, dk, row_block=False), *count_specs],
        out_specs=pl.BlockSpec((None, None, None, dk, bv),
                               lambda bh, s, j: (bh // H, bh % H, s, 0, j)),
        out_shape=jax.ShapeDtypeStruct((B, H, segments, dk, dv), _f32),
        compiler_params=_params(block_sizes),
        interpret=compat.pallas_interpret(),
        name=("lasp2_prescaled_summary_bwd" if reverse else "lasp2_prescaled_summary")
        + _docs_suffix(cnt),
    )(x, y, ad, *counts)


def _docs_suffix(cnt) -> str:
    """The kernel name's suffix for the kernels with document masks (profiles tell them apart)."""
    return "" if cnt is None else "_docs"


def _counts(cnt, H: int, L: int):
    """(operands, BlockSpecs) of the reset counts cnt [B, H, T] for a program of segment s,
    its L tokens; empty for None (no reset in the call: the kernels get a None ref)."""
    if cnt is None:
        return [], []
    return [cnt], [pl.BlockSpec((None, None, L), lambda bh, s, j: (bh // H, bh % H, s))]


def _chunk_decay_spec(H: int, K: int, rows: int, row_block: bool):
    """The BlockSpec of ad [B, H, N, Dk] for a program of segment s: its K chunks, and all of
    Dk or the program's Dk block."""
    if row_block:
        return pl.BlockSpec((None, None, K, rows), lambda bh, s, j: (bh // H, bh % H, s, j))
    return pl.BlockSpec((None, None, K, rows), lambda bh, s, j: (bh // H, bh % H, s, 0))


def _output_kernel(qe_ref, ke_ref, v_ref, ad_ref, cnt_ref, s0_ref, m_ref, a_ref, o_ref,
                   final_ref, *, c: int, n_chunks: int, scale: float, n_seg: int):
    def body(ci, state):
        sl = pl.ds(pl.multiple_of(ci * c, c), c)
        qe, ke, v, ad = qe_ref[sl, :], ke_ref[sl, :], v_ref[sl, :], ad_ref[ci, :]
        resets = ChunkResets.load(cnt_ref, sl, c)
        a = jnp.where(resets.same, mm(qe, ke, tb=True), 0.0)
        o = mm(a.astype(v.dtype), v) + resets.before_first(mm(qe, state.astype(qe.dtype)))
        o_ref[sl, :] = (scale * o).astype(o_ref.dtype)
        return resets.state_decay(ad) * state + mm(resets.last_keys(ke, ad), v, ta=True)

    state = lax.fori_loop(0, n_chunks, body, segment_entry_state(s0_ref, m_ref, a_ref))
    if n_seg == 1:  # with several segments the caller folds the summaries instead
        final_ref[...] = state


def forward_outputs(qe, ke, v, ad, cnt, s0, m, a, *, chunk: int, scale: float, block_sizes,
                    out_dtype):
    """Outputs [B, T, H, Dv] and, with one segment, the final state [B, H, Dk, Dv] float32
    (with several, that output is not written: fold the summaries).

    ad, cnt: :func:`prescale` (cnt None where the call has no reset); s0 [B, H, Dk, Dv];
    m [B, H, S, Dk, Dv] the segment summaries; a [B, H, S, Dk] the segment decays
    (:func:`segment_decays`)."""
    B, T, H, dk = qe.shape
    dv = v.shape[-1]
    S = m.shape[2]
    L = T // S
    bv = min(block_sizes.block_v, dv)
    full = pl.BlockSpec((None, L, None, dk), lambda bh, s, j: (bh // H, s, bh % H, 0))
    vcol = pl.BlockSpec((None, L, None, bv), lambda bh, s, j: (bh // H, s, bh % H, j))
    counts, count_specs = _counts(cnt, H, L)
    return pl.pallas_call(
        absent_refs(functools.partial(_output_kernel, c=chunk, n_chunks=L // chunk, scale=scale,
                                      n_seg=S), 1 - len(counts), position=4),
        grid=(B * H, S, dv // bv),
        in_specs=[full, full, vcol, _chunk_decay_spec(H, L // chunk, dk, False),
                  *count_specs, *summary_specs(H, S, dk, bv, row_block=False)],
        out_specs=[vcol, pl.BlockSpec((None, None, dk, bv),
                                      lambda bh, s, j: (bh // H, bh % H, 0, j))],
        out_shape=[jax.ShapeDtypeStruct((B, T, H, dv), out_dtype),
                   jax.ShapeDtypeStruct((B, H, dk, dv), _f32)],
        compiler_params=_params(block_sizes),
        interpret=compat.pallas_interpret(),
        name="lasp2_prescaled_fwd" + _docs_suffix(cnt),
    )(qe, ke, v, ad, *counts, s0, m, a)


# --------------------------------------------------------------------------------------------
# Backward: dq (chunks in order, carrying rows of the state), dk and dv (in reverse, carrying
# rows or columns of the cotangent of the leaving state).


def _masked_dp(do, v, same, scale: float, dtype):
    """scale * dO v^T on the pairs ``same`` (ChunkResets), as a matmul operand of ``dtype``
    [C, C]."""
    return jnp.where(same, scale * mm(do, v, tb=True), 0.0).astype(dtype)


def _dq_kernel(qe_ref, ke_ref, v_ref, do_ref, eb_ref, ad_ref, cnt_ref, s0_ref, m_ref, a_ref,
               dq_ref, db_ref, states_ref, *, c: int, n_chunks: int, scale: float,
               split: frozenset, anchor: int):
    def body(ci, state):  # state: rows [bk] of the state entering chunk ci
        sl = pl.ds(pl.multiple_of(ci * c, c), c)
        ke, v, do, ad = ke_ref[sl, :], v_ref[sl, :], do_ref[sl, :], ad_ref[ci, :]
        # Loaded at the step's start, as the matmuls' operands are: loaded where they are
        # used, they made GLA's forward+backward 1% slower (NOTES_kernels.md v17).
        eb = eb_ref[sl, :].astype(_f32)
        qe = qe_ref[sl, :] if db_ref is not None else None
        resets = ChunkResets.load(cnt_ref, sl, c)
        dpl = _masked_dp(do, v, resets.same, scale, ke.dtype)
        inter = scale * mmx(do, lowp(state, do.dtype, "state", split), tb=True)
        dqe = mm(dpl, ke) + resets.before_first(inter)
        dq_ref[sl, :] = (dqe * eb).astype(dq_ref.dtype)
        if db_ref is not None:
            # q dq = qe dqe. Its diagonal pair cancels against k dk's at the same token, in
            # float32 and at a size bounded by q . k (on this path no decay is strong enough to
            # make it dominate, as it can on the exact kernels, which leave it out)
            db_ref[sl, :] = qe.astype(_f32) * dqe
        leaving = resets.state_decay(ad) * state + mm(resets.last_keys(ke, ad), v, ta=True)
        if states_ref is not None:  # anchored: the state leaving each group, for dk

            @pl.when(lax.rem(ci + 1, anchor) == 0)
            def _():
                states_ref[ci // anchor] = leaving.astype(states_ref.dtype)

        return leaving

    lax.fori_loop(0, n_chunks, body, segment_entry_state(s0_ref, m_ref, a_ref))


def _anchored_sums_from_end(db_ref, dbq_ref, sl, k_dk, after, state, dh, group_end):
    """Write one chunk's dg [C, bk] and return dg at its first token ([bk]).

    dbq_ref, k_dk: the chunk's q dq (the dq kernel's) and k dk [C, bk], whose difference is
    dL/db; after: dg at the first token after the chunk;
    state, dh: the stored state leaving the group [bk, Dv] and the float32 cotangent of the
    state leaving this chunk; group_end: whether this chunk ends its group.
    At a group's end dg restarts from the pairs crossing it, <S[i, :], dS[i, :]>; then
    dg_t = after + sum_{t <= s <= chunk end} x_s. The anchor is formed at every chunk and
    selected: a lax.cond around it made the forward+backward 0.02 ms slower on an H100. dS
    enters in float32: taking it rounded to bf16, as the dk matmul takes it, cancels part of
    its rounding error against this chunk's k dk (a CPU comparison gave a bf16 decay-gradient
    error of 5.7e-3 that way, 6.2e-3 with dS in float32), but made the dk kernel 0.29 ms
    slower on an H100 (NOTES_kernels.md v15)."""
    at_end = jnp.sum(state.astype(_f32) * dh, axis=1)
    after = jnp.where(group_end, at_end, after)
    x = dbq_ref[sl, :] - k_dk  # loaded after the anchor: in the other order the compiled
    total = jnp.sum(x, axis=0)  # kernel spilled 164 bytes, not 128 (kernel_resources.py)
    db_ref[sl, :] = (after + total)[None, :] - (jnp.cumsum(x, axis=0) - x)
    return after + total


def _dk_kernel(qe_ref, ke_ref, v_ref, do_ref, eb_ref, ad_ref, cnt_ref, dst_ref, dm_ref, a_ref,
               states_ref, dbq_ref, dk_ref, db_ref, *, c: int, n_chunks: int, scale: float,
               split: frozenset, anchor: int):
    """dk and, for the decay gradient, k dk (db_ref) or, anchored (states_ref given), the
    finished dg there, from the dq kernel's q dq (dbq_ref) and the states it stored."""

    def body(i, carry):
        # dh: rows [bk] of the cotangent of the state leaving chunk ci; after [bk], anchored:
        # dg at the first token after chunk ci (the pairs crossing that position)
        dh, after = carry
        ci = n_chunks - 1 - i
        sl = pl.ds(pl.multiple_of(ci * c, c), c)
        qe, v, do = qe_ref[sl, :], v_ref[sl, :], do_ref[sl, :]
        einv = 1.0 / eb_ref[sl, :].astype(_f32)  # exp(-b); loaded early, as in dq
        ke = ke_ref[sl, :] if db_ref is not None else None
        resets = ChunkResets.load(cnt_ref, sl, c)
        dpl = _masked_dp(do, v, resets.same, scale, qe.dtype)
        dke = mm(dpl, qe, ta=True)
        dkd = resets.after_last(mmx(v, lowp(dh, v.dtype, "state", split), tb=True))
        ad = ad_ref[ci, :]
        dke_total = dke + ad[None, :] * dkd  # the gradient of ke
        dk = dke_total * einv
        dk_ref[sl, :] = dk.astype(dk_ref.dtype)
        if db_ref is not None:
            if states_ref is not None and pallas_forward.DG_DIRECT_PRODUCTS:  # anchored
                k_dk = ke.astype(_f32) * dke_total  # kd = ke exp(b_C)
            else:  # k dk = ke dke + kd dkd (see dq for the diagonal pair)
                k_dk = ke.astype(_f32) * dke + resets.last_keys(ke, ad).astype(_f32) * dkd
            if states_ref is None:  # summed from the end by pallas_scans.reverse_decay_sums
                db_ref[sl, :] = k_dk
            else:
                after = _anchored_sums_from_end(db_ref, dbq_ref, sl, k_dk, after,
                                                states_ref[ci // anchor], dh,
                                                lax.rem(ci + 1, anchor) == 0)
        # the cotangent of the entering state
        dh_in = resets.state_decay(ad) * dh + scale * mm(resets.before_first(qe), do, ta=True)
        return dh_in, after

    entering = segment_entry_state(dst_ref, dm_ref, a_ref, reverse=True)
    lax.fori_loop(0, n_chunks, body, (entering, jnp.zeros(entering.shape[:1], _f32)))


def _dv_kernel(qe_ref, ke_ref, do_ref, ad_ref, cnt_ref, dst_ref, dm_ref, a_ref, dv_ref,
               ds0_ref, *, c: int, n_chunks: int, scale: float):
    def body(i, dh):  # dh: columns [bv] of the cotangent of the state leaving chunk ci
        ci = n_chunks - 1 - i
        sl = pl.ds(pl.multiple_of(ci * c, c), c)
        qe, ke, do, ad = qe_ref[sl, :], ke_ref[sl, :], do_ref[sl, :], ad_ref[ci, :]
        resets = ChunkResets.load(cnt_ref, sl, c)
        a = jnp.where(resets.same, mm(qe, ke, tb=True), 0.0)
        dv = (scale * mm(a.astype(do.dtype), do, ta=True)
              + mm(resets.last_keys(ke, ad), dh.astype(ke.dtype)))
        dv_ref[sl, :] = dv.astype(dv_ref.dtype)
        return (resets.state_decay(ad) * dh
                + scale * mm(resets.before_first(qe), do, ta=True))

    dh = lax.fori_loop(0, n_chunks, body,
                       segment_entry_state(dst_ref, dm_ref, a_ref, reverse=True))

    @pl.when(pl.program_id(1) == 0)
    def _():
        ds0_ref[...] = dh  # the cotangent of the initial state


def backward(qe, ke, v, do, eb, ad, cnt, s0, m, final, dst, dm, a, *, chunk: int,
             scale: float, block_sizes, decay_grad: bool):
    """dq, dk, dv [B, T, H, *] (input dtype), the log-decay gradient dg [B, T, H, Dk] float32
    (None without decay_grad) and the initial-state cotangent [B, H, Dk, Dv] float32.

    qe, ke, eb, ad, cnt: :func:`prescale` (cnt None where the call has no reset); s0, m, final:
    the initial state, forward summaries and final state [B, H, Dk, Dv]; dst, dm: the
    final-state cotangent and backward summaries; a: the segment decays. block_sizes:
    pallas_backward.BlockSizes.
    """
    B, T, H, dk = qe.shape
    dv = v.shape[-1]
    S = m.shape[2]
    L = T // S
    K = L // chunk
    bk, bv = min(block_sizes.block_k, dk), min(block_sizes.block_v, dv)
    interpret = compat.pallas_interpret()
    # Groups of one chunk would store a state per chunk; for a scalar decay that was slower
    # than the split (0.953 against 0.887 ms on an H100, NOTES_kernels.md v11), so segments
    # whose chunk count is odd take the split instead.
    anchor = anchor_group(K)
    anchored = decay_grad and ANCHORED_DG and anchor > 1
    split = STATE_SPLIT if decay_grad and not anchored else frozenset()
    n_groups = K // anchor

    def seq(d, col):
        return pl.BlockSpec((None, L, None, d), (lambda bh, s, j: (bh // H, s, bh % H, j)) if col
                            else (lambda bh, s, j: (bh // H, s, bh % H, 0)))

    kblock = seq(bk, True)
    counts, count_specs = _counts(cnt, H, L)
    row_specs = [kblock, kblock, seq(dv, False), seq(dv, False), kblock,
                 _chunk_decay_spec(H, K, bk, True), *count_specs,
                 *summary_specs(H, S, bk, dv, True)]
    grad = jax.ShapeDtypeStruct((B, T, H, dk), qe.dtype)
    db = jax.ShapeDtypeStruct((B, T, H, dk), _f32)
    outs, out_specs = ([grad, db], [kblock] * 2) if decay_grad else ([grad], [kblock])
    common = dict(c=chunk, n_chunks=K, scale=scale, split=split, anchor=anchor)
    # Anchored: the states leaving the groups, which the dq kernel stores for the dk kernel.
    states = jax.ShapeDtypeStruct((B, H, S, n_groups, dk, dv), qe.dtype)
    states_spec = pl.BlockSpec((None, None, None, n_groups, bk, dv),
                               lambda bh, s, j: (bh // H, bh % H, s, 0, j, 0))

    def call(kernel, name, state, summaries, n_inputs, n_outputs, extra_in=(), extra_out=()):
        """The dq or dk kernel over Dk blocks, from the state (or cotangent) it folds. The
        kernel takes n_inputs input refs and n_outputs output refs (dq: dq, q dq, the states;
        dk: dk, k dk or dg); those that this call does not pass (the decay gradient's, the
        anchored form's) are None, as is the counts ref (the seventh) without resets."""
        n_in = len(row_specs) + 1 - len(counts) + len(extra_in)  # with the counts ref
        kernel_refs = absent_refs(absent_refs(
            absent_refs(functools.partial(kernel, **common),
                        n_outputs - len(out_specs) - len(extra_out)),
            n_inputs - n_in, position=n_in), 1 - len(counts), position=6)
        return pl.pallas_call(
            kernel_refs, grid=(B * H, S, dk // bk),
            in_specs=row_specs + [spec for spec, _ in extra_in],
            out_specs=out_specs + [spec for spec, _ in extra_out],
            out_shape=outs + [shape for _, shape in extra_out],
            compiler_params=_params(block_sizes), interpret=interpret,
            name=name + _docs_suffix(cnt),
        )(qe, ke, v, do, eb, ad, *counts, state, summaries, a, *[x for _, x in extra_in])

    dq, *dbq = call(_dq_kernel, "lasp2_prescaled_bwd_dq", s0, m, 10, 3,
                    extra_out=[(states_spec, states)] * anchored)
    dg = None
    if anchored:
        dbq, states = dbq
        dk_, dg = call(_dk_kernel, "lasp2_prescaled_bwd_dk", dst, dm, 12, 2,
                       extra_in=[(states_spec, states), (kblock, dbq)])
    elif decay_grad:  # the difference form summed from the end, as pallas.py's scalar decays
        dk_, dbk = call(_dk_kernel, "lasp2_prescaled_bwd_dk", dst, dm, 12, 2)
        dg = pallas_scans.reverse_decay_sums(dbq[0], dbk, jnp.sum(final * dst, axis=-1), chunk)
    else:
        (dk_,) = call(_dk_kernel, "lasp2_prescaled_bwd_dk", dst, dm, 12, 2)
    vcol = seq(bv, True)
    dv_, ds0 = pl.pallas_call(
        absent_refs(functools.partial(_dv_kernel, c=chunk, n_chunks=K, scale=scale),
                    1 - len(counts), position=4),
        grid=(B * H, S, dv // bv),
        in_specs=[seq(dk, False), seq(dk, False), vcol,
                  _chunk_decay_spec(H, K, dk, False), *count_specs,
                  *summary_specs(H, S, dk, bv, False)],
        out_specs=[vcol, pl.BlockSpec((None, None, dk, bv),
                                      lambda bh, s, j: (bh // H, bh % H, 0, j))],
        out_shape=[jax.ShapeDtypeStruct((B, T, H, dv), v.dtype),
                   jax.ShapeDtypeStruct((B, H, dk, dv), _f32)],
        compiler_params=_params(block_sizes), interpret=interpret,
        name="lasp2_prescaled_bwd_dv" + _docs_suffix(cnt),
    )(qe, ke, do, ad, *counts, dst, dm, a)
    return dq, dk_, dv_, dg, ds0
