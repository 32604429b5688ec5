"""Pallas backward kernels of chunked linear attention: dq, dk, dv (and the decay terms).

Forward, per chunk with S the state entering it (DESIGN.md §1, notation of pallas_forward):
    o   = scale * (A v + diag(exp(b)) q S),   A = (q k^T) * W,  W_ij = exp(b_i - b_j) [j <= i]
    S' = diag(exp(b_C)) S + (diag(exp(b_C - b_j)) k)^T v
With dO the output cotangent, dS' the cotangent of the state leaving the chunk and
dP = scale * dO v^T:
    dq = (dP * W) k + scale * diag(exp(b)) dO S^T                       (forward order: needs S)
    dk = (dP * W)^T q + diag(exp(b_C - b_j)) v dS'^T                     (reverse order: needs dS')
    dv = scale * A^T dO + diag(exp(b_C - b_j)) k dS'
    dS = diag(exp(b_C)) dS' + scale * (diag(exp(b)) q)^T dO               (the reverse recurrence)
The log-decay gradient uses the identity of the exponent's linearity in the prefix sums
b_t = sum_{s<=t} g_s: dL/db_t = q_t * dq_t - k_t * dk_t (+ sum_e S_T dS_T at t = T), so
dg_t = sum_{s>=t} dL/db_s; the kernels emit q*dq and k*dk, the caller sums them up. The
diagonal pair (i = j) adds the same dP_tt W_tt (q_t . k_t) to both products and cancels in the
difference. With float32 inputs both kernels leave it out, which keeps that large pair out of
the sums (with a strong decay it dominates each product; in float32 the dg error dropped 3-4x);
with bf16 inputs it stays in, as it cancels there to float32 accumulation error
(:func:`_difference_side`).

Anchored form (scalar decays in pallas_forward.ANCHORED_DG_MODES, the default): the same
per-token q dq - k dk with no operand split, summed only inside groups of DG_ANCHOR_CHUNKS
chunks. dg at a group's first position t0 is the sum of the pair terms over s < t0 <= t,
<S, dS> for the state S entering the group and its cotangent dS, a sum without cancellation;
from there dg_t = dg_t0 - sum_{t0 <= u < t} dL/db_u. The dq kernel stores S (in the input
dtype) at each group's start; the dk kernel, which carries dS, forms <S, dS> there. The
initial state and the final-state cotangent are in S and dS, so no other term is needed.
Rounding errors add up over one group instead of the whole sequence, so with bf16 inputs the
products are simply q times the float32 dq and k times dk
(pallas_forward.DG_DIRECT_PRODUCTS).

Crossing form (scalar decays in pallas_forward.CROSSING_DG_MODES, an alternative, not the
default since v10: slower, though more precise under strong decays): dg_u is the sum of the pair
terms P_ts = exp(b_t - b_s) (q_t . k_s) (dO_t . v_s) over s < u <= t, with no cancellation.
Per chunk: the pairs inside it (corner sums of P, from the dq kernel), those entering from
earlier chunks into t >= u (suffix sums of q_t . dq_inter_t, dq kernel), those leaving from
s < u to later chunks (prefix sums of k_s . dk_inter_s, dk kernel) and those passing over the
chunk, exp(b_C) <S, dS'> with S the state entering it (stored by the dq kernel) and dS' the
cotangent of the state leaving it (dk kernel). The caller only adds the two outputs
(pallas_crossing has the sums).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lasp2_jax import compat
from lasp2_jax.kernels import pallas_crossing, pallas_forward
from lasp2_jax.kernels.pallas_forward import (
    PER_DIM,
    SCALAR,
    _scaled,
    absent_refs,
    causal_mask,
    chunk_loop,
    chunk_scores,
    decay_operands,
    decayed_mm,
    decayed_tmm,
    fast_factors,
    load_factors,
    lowp,
    mm,
    mmx,
    pair_weights,
    pair_weights_dim,
    pow2,
    run_chunk,
    segment_entry_state,
    summary_specs,
    with_decay_refs,
)

_f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the backward kernels (the chunk and segments come from the forward).

    block_k: Dk columns per dq / dk program (per-dimension decay: at most 32, the pairwise
      product is [C, C, block_k]).
    block_v: Dv columns per dv program.
    num_warps, num_stages: Triton launch parameters.
    """

    block_k: int = 64
    block_v: int = 64
    num_warps: int = 4
    num_stages: int = 2




def _decay_block_operands(bf, cnt, fast, L: int, H: int, bk: int):
    """Like decay_operands, but per-dimension decays are cut into Dk blocks of bk."""
    args, specs = decay_operands(bf, cnt, L, H, bk, fast)
    if bf is None or bf.ndim == 3:
        return args, specs
    spec = pl.BlockSpec((None, L, None, bk), lambda bh, s, j: (bh // H, s, bh % H, j))
    return args, [spec, spec, *specs[2:]]


def _weighted_dp(dp, bf_ref, cnt_ref, sl, mode: str, c: int, factorised: bool):
    """dP * W for the scalar and no-decay forms ([C, C])."""
    if mode == SCALAR:
        return dp * pair_weights(bf_ref, cnt_ref, sl, c, factorised)
    return jnp.where(causal_mask(c), dp, 0.0)


def _db_put(db_ref, sl, prod, mode: str):
    if mode == SCALAR:
        db_ref[sl] = jnp.sum(prod, axis=1)
    else:
        db_ref[sl, :] = prod


def _as_f32(x):
    """A matmul operand from lowp (an array or a (hi, lo) pair) back in float32."""
    if isinstance(x, tuple):
        return x[0].astype(_f32) + x[1].astype(_f32)
    return x.astype(_f32)


def diagonal_column(x):
    """The diagonal of a [C, C] matmul operand (see _as_f32), as a [C, 1] float32 column."""
    x = _as_f32(x)
    eye = (lax.broadcasted_iota(jnp.int32, x.shape, 0)
           == lax.broadcasted_iota(jnp.int32, x.shape, 1))
    return jnp.sum(jnp.where(eye, x, 0.0), axis=1, keepdims=True)


def _db_store(db_ref, sl, x, dx, mode: str):
    """Store x * dx for the decay gradient: summed over Dk for the scalar form."""
    _db_put(db_ref, sl, x.astype(_f32) * dx, mode)


def _difference_side(x, intra, scores, y, f, inter, split: frozenset):
    """One side of the difference form off the per-dimension fast path: q dq (x = q, y = k,
    f = fq) or k dk (x = k, y = q, f = fk), [C, block] float32 before any sum over Dk.

    intra, scores: the intra-chunk term and the [C, C] scores it came from; inter: the
    inter-chunk term before the factor f. The diagonal pair is left out for float32 inputs
    only (module docstring). With bf16 inputs both sides form it from the same score (rounded
    alike by both kernels for a scalar decay, float32 per dimension) and the same bf16 q_t and
    k_t, so it cancels to float32 rounding anyway; and the [C, C] diagonal reduction that
    leaving it out costs took 0.1 ms of GLA's dk kernel on an H100 (NOTES_kernels.md, v9).

    The inter-chunk term's pairs reach the other side through a state, where x * f entered a
    matmul as ``_scaled`` rounds it; taking the same rounded operand here makes those pair
    terms equal numbers on both sides, so they cancel in the difference whatever the rounding
    (a scalar decay then needs no split of the decayed operands, only of the states)."""
    x32 = x.astype(_f32)
    own = x32 * intra
    if x.dtype == _f32:
        own = own - x32 * diagonal_column(scores) * y.astype(_f32)
    if f is None:
        return own + x32 * inter
    return own + _as_f32(_scaled(x, f, split)) * inter


def _anchored_products(x, grad, intra, scores, y, f, inter, split: frozenset):
    """[C] x_t . grad_t over this program's Dk block for the anchored form: x times the float32
    gradient (pallas_forward.DG_DIRECT_PRODUCTS, bf16 inputs), else as _difference_side.
    x, grad: q and dq, or k and dk, [C, block]; the other arguments are those of
    _difference_side."""
    if pallas_forward.DG_DIRECT_PRODUCTS and x.dtype != _f32:
        return jnp.sum(x.astype(_f32) * grad, axis=1)
    return jnp.sum(_difference_side(x, intra, scores, y, f, inter, split), axis=1)


def _exact_intra(dp, x, bf_ref, cnt_ref, sl, cc: int, mode: str, fast: bool, split: frozenset,
                 *, transpose: bool):
    """The intra-chunk term of dq, (dP * W) k (x = k), or of dk, (dP * W)^T q (x = q,
    transpose), off the per-dimension fast path. Also returns the [C, C] scores as they entered
    the product, whose diagonal the decay gradient leaves out (module docstring)."""
    if mode == PER_DIM:
        w = pair_weights_dim(bf_ref[sl, :], cnt_ref[sl, :], cc)
        x32 = x.astype(_f32)
        if transpose:
            return jnp.sum(dp[:, :, None] * x32[:, None, :] * w, axis=0), dp
        return jnp.sum(dp[:, :, None] * x32[None, :, :] * w, axis=1), dp
    wdp = lowp(_weighted_dp(dp, bf_ref, cnt_ref, sl, mode, cc, fast), x.dtype, "dscores", split)
    return mmx(wdp, x, ta=transpose), wdp


# --------------------------------------------------------------------------------------------
# dq: chunks in order, carrying the rows [block_k] of the state entering each chunk.


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, bf_ref, cnt_ref, fast_ref, s0_ref, m_ref, a_ref,
               dq_ref, db_ref, states_ref, *, c: int,
               n_chunks: int, mode: str, scale: float, split: frozenset, anchor: int):
    def load(sl):
        return q_ref[sl, :], k_ref[sl, :], v_ref[sl, :], do_ref[sl, :]

    def step(sl, cc, state, before, fast, tiles):
        q, k, v, do = tiles
        dp = scale * mm(do, v, tb=True)
        inter = scale * mmx(do, lowp(state, do.dtype, "state", split), tb=True)
        if fast and mode == PER_DIM:
            # dq = exp(b) * ((dP masked) (k exp(-b)) + dO S^T): k exp(-b) enters in two bf16
            # parts, so the decay gradient q * dq keeps ~16 bits (see DG_SPLIT).
            e, einv, fk, fa = fast_factors(bf_ref, sl)
            ks = lowp(k.astype(_f32) * einv, k.dtype, "qk_decay", split)
            dpl = jnp.where(causal_mask(cc), dp, 0.0).astype(k.dtype)
            dq = e * (mmx(dpl, ks) + inter)
            if db_ref is not None:
                _db_store(db_ref, sl, q, dq - e * diagonal_column(dpl) * _as_f32(ks), mode)
        else:
            f = load_factors(bf_ref, cnt_ref, sl, mode, before, fast)
            fq, fk, fa = (None, None, 1.0) if f is None else f
            intra, scores = _exact_intra(dp, k, bf_ref, cnt_ref, sl, cc, mode, fast, split,
                                         transpose=False)
            entering = inter if fq is None else inter * fq
            dq = intra + entering
            if states_ref is not None and not anchor:  # crossing form
                states_ref[sl.start // cc] = state.astype(states_ref.dtype)
                db_ref[sl] = pallas_crossing.inside_and_entering_sums(q, k, scores, entering, cc)
            elif db_ref is not None and anchor:
                db_ref[sl] = _anchored_products(q, dq, intra, scores, k, fq, inter, split)
            elif db_ref is not None:
                _db_put(db_ref, sl, _difference_side(q, intra, scores, k, fq, inter, split),
                        mode)
        dq_ref[sl, :] = dq.astype(dq_ref.dtype)
        leaving = fa * state + mmx(_scaled(k, fk, split), v, ta=True)
        if states_ref is not None and anchor:
            # The state entering each group's first chunk, for dk, stored as it leaves the
            # chunk before (the first group's before the loop). Stored at the group's first
            # chunk instead (until v14), the compiled kernel spilled more registers (592
            # against 460 bytes for sm_90a) but ran as fast on an H100 (NOTES_kernels.md v15).
            nxt = sl.start // cc + 1

            @pl.when((lax.rem(nxt, anchor) == 0) & (nxt < n_chunks))
            def _():
                states_ref[nxt // anchor] = leaving.astype(states_ref.dtype)

        return leaving

    def body(ci, state, factorised):
        return run_chunk(step, load, ci, state, c=c, mode=mode, bf_ref=bf_ref, cnt_ref=cnt_ref,
                         factorised=factorised)

    entering = segment_entry_state(s0_ref, m_ref, a_ref)
    if states_ref is not None and anchor:
        states_ref[0] = entering.astype(states_ref.dtype)
    chunk_loop(n_chunks, body, entering, mode=mode, fast_ref=fast_ref)


# --------------------------------------------------------------------------------------------
# dk: chunks in reverse, carrying the rows [block_k] of the cotangent of the leaving state.


def _dk_kernel(q_ref, k_ref, v_ref, do_ref, bf_ref, cnt_ref, fast_ref, dst_ref, dm_ref, a_ref,
               states_ref, dk_ref, db_ref, anchors_ref, *, c: int,
               n_chunks: int, mode: str, scale: float, split: frozenset, anchor: int):
    def load(sl):
        return q_ref[sl, :], k_ref[sl, :], v_ref[sl, :], do_ref[sl, :]

    def step(sl, cc, dh, before, fast, tiles):
        q, k, v, do = tiles
        dp = scale * mm(do, v, tb=True)
        inter = mmx(v, lowp(dh, v.dtype, "state", split), tb=True)
        if fast and mode == PER_DIM:
            e, einv, fk, fa = fast_factors(bf_ref, sl)
            qs = lowp(q.astype(_f32) * e, q.dtype, "qk_decay", split)
            dpl = jnp.where(causal_mask(cc), dp, 0.0).astype(q.dtype)
            dk = einv * mmx(dpl, qs, ta=True) + inter * fk
            if db_ref is not None:
                _db_store(db_ref, sl, k, dk - einv * diagonal_column(dpl) * _as_f32(qs), mode)
            q_dh = qs  # q exp(b), as the dS update below needs it
        else:
            f = load_factors(bf_ref, cnt_ref, sl, mode, before, fast)
            fq, fk, fa = (None, None, 1.0) if f is None else f
            intra, scores = _exact_intra(dp, q, bf_ref, cnt_ref, sl, cc, mode, fast, split,
                                         transpose=True)
            leaving = inter if fk is None else inter * fk
            dk = intra + leaving
            if states_ref is not None and not anchor:  # crossing form
                db_ref[sl] = pallas_crossing.leaving_and_passing_sums(
                    k, leaving, states_ref[sl.start // cc], dh, fa)
            elif db_ref is not None and anchor:
                db_ref[sl] = _anchored_products(k, dk, intra, scores, q, fk, inter, split)
            elif db_ref is not None:
                _db_put(db_ref, sl, _difference_side(k, intra, scores, q, fk, inter, split),
                        mode)
            q_dh = _scaled(q, fq, split)
        dk_ref[sl, :] = dk.astype(dk_ref.dtype)
        dh_in = fa * dh + scale * mmx(q_dh, do, ta=True)  # the cotangent of the entering state
        if anchors_ref is not None:  # the pairs crossing the group's start: <S_in, dS_in>
            ci = sl.start // cc

            @pl.when(lax.rem(ci, anchor) == 0)
            def _():
                x = jnp.sum(states_ref[ci // anchor].astype(_f32) * dh_in)
                anchors_ref[pl.ds(ci // anchor, 1)] = jnp.full((1,), x, _f32)

        return dh_in

    def body(i, dh, factorised):
        return run_chunk(step, load, n_chunks - 1 - i, dh, c=c, mode=mode, bf_ref=bf_ref,
                         cnt_ref=cnt_ref, reverse=True, factorised=factorised)

    chunk_loop(n_chunks, body, segment_entry_state(dst_ref, dm_ref, a_ref, reverse=True),
               mode=mode, fast_ref=fast_ref)


# --------------------------------------------------------------------------------------------
# dv: chunks in reverse, carrying the columns [block_v] of the cotangent of the leaving state.


def _dv_kernel(q_ref, k_ref, do_ref, bf_ref, cnt_ref, fast_ref, dst_ref, dm_ref, a_ref, dv_ref,
               ds0_ref, *,
               c: int,
               n_chunks: int, mode: str, scale: float, dk: int, dim_slice: int):
    def load(sl):
        return q_ref[sl, :], k_ref[sl, :], do_ref[sl, :]

    def step(sl, cc, dh, before, fast, tiles):
        q, k, do = tiles
        a, fq, fk, fa = chunk_scores(q, k, q_ref, k_ref, bf_ref, cnt_ref, sl, cc, before, fast,
                                     mode=mode, dk=dk, dim_slice=dim_slice)
        dv = scale * mm(a.astype(do.dtype), do, ta=True) + decayed_mm(k, fk, dh.astype(k.dtype),
                                                                      mode)
        dv_ref[sl, :] = dv.astype(dv_ref.dtype)
        return fa * dh + scale * decayed_tmm(q, fq, do, mode)

    def body(i, dh, factorised):
        return run_chunk(step, load, n_chunks - 1 - i, dh, c=c, mode=mode, bf_ref=bf_ref,
                         cnt_ref=cnt_ref, reverse=True, factorised=factorised)

    dh = chunk_loop(n_chunks, body, segment_entry_state(dst_ref, dm_ref, a_ref, reverse=True),
                    mode=mode, fast_ref=fast_ref)

    @pl.when(pl.program_id(1) == 0)
    def _():
        ds0_ref[...] = dh  # the cotangent of the initial state


def anchor_chunks(n_chunks: int) -> int:
    """The chunks per group of the anchored decay gradient, for segments of n_chunks."""
    return max(1, min(pallas_forward.DG_ANCHOR_CHUNKS, n_chunks))


def backward(q, k, v, do, bf, cnt, fast, s0, m, dst, dm, a, *, mode: str, scale: float,
             chunk: int, block_sizes: BlockSizes, dim_slice: int, parts=("dq", "dk", "dv"),
             decay_grad: bool = True):
    """dq, dk, dv [B, T, H, *] (input dtype), q*dq and k*dk for the decay gradient
    ([B, H, NK, T] partial sums for a scalar decay, [B, T, H, Dk] per dimension; None without
    decay or without decay_grad; in the crossing form the two sides' crossing sums, whose total
    is the gradient), the initial-state cotangent [B, H, Dk, Dv] and, in the anchored form,
    (anchor terms [B, H, S, n_groups], chunks per group), else None.

    fast [B, H, S]: the per-segment flags of pallas_forward.chunk_loop.

    s0, m: the initial state [B, H, Dk, Dv] and the forward summaries [B, H, S, Dk, Dv];
    dst, dm: the final-state cotangent and the backward summaries; a [B, H, S, Dk] the segment
    decays. Each program folds them into the state (or cotangent) at its segment's boundary.
    """
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    S = m.shape[2]
    L = T // S
    c = chunk
    bk = min(block_sizes.block_k, dk)
    if mode == PER_DIM:
        bk = min(bk, dim_slice)
    bv = min(block_sizes.block_v, dv)
    nk, nv = dk // bk, dv // bv
    params = compat.triton_compiler_params(block_sizes.num_warps, block_sizes.num_stages)
    interpret = compat.pallas_interpret()
    has_decay = bf is not None

    def seq(d, col):
        return pl.BlockSpec((None, L, None, d),
                                          (lambda bh, s, j: (bh // H, s, bh % H, j)) if col
                                          else (lambda bh, s, j: (bh // H, s, bh % H, 0)))
    dargs, dspecs = _decay_block_operands(bf, cnt, fast, L, H, bk)
    emit_db = has_decay and decay_grad
    if mode == SCALAR:
        db_shape = jax.ShapeDtypeStruct((B, H, nk, T), _f32)  # head-major, as the decays
        db_spec = pl.BlockSpec((None, None, None, L), lambda bh, s, j: (bh // H, bh % H, j, s))
    else:
        db_shape = jax.ShapeDtypeStruct((B, T, H, dk), _f32)
        db_spec = seq(bk, True)
    out_shapes = [jax.ShapeDtypeStruct((B, T, H, dk), q.dtype)]
    out_specs = [seq(bk, True)]
    if emit_db:
        out_shapes.append(db_shape)
        out_specs.append(db_spec)
    # Crossing form: the dq kernel stores the state entering each chunk for the dk kernel;
    # anchored form: entering each group of `anchor` chunks, and the dk kernel writes the
    # group's anchor term ([B, H, NK, S, slots], the first n_states slots written).
    n_c = L // c
    crossing = emit_db and mode in pallas_forward.CROSSING_DG_MODES
    anchored = emit_db and not crossing and mode in pallas_forward.ANCHORED_DG_MODES
    anchor = anchor_chunks(n_c) if anchored else 0
    stores = int(crossing or anchored)
    n_states = n_c if crossing else -(-n_c // max(anchor, 1))
    states_shape = jax.ShapeDtypeStruct((B, H, S, n_states, dk, dv), q.dtype)
    states_spec = pl.BlockSpec((None, None, None, n_states, bk, dv),
                               lambda bh, s, j: (bh // H, bh % H, s, 0, j, 0))
    slots = pow2(n_states)  # a block of a power of two for Triton
    anchors_shape = jax.ShapeDtypeStruct((B, H, nk, S, slots), _f32)
    anchors_spec = pl.BlockSpec((None, None, None, None, slots),
                                lambda bh, s, j: (bh // H, bh % H, j, s, 0))

    common = dict(c=c, n_chunks=n_c, mode=mode, scale=scale)
    split = pallas_forward.dg_split(mode, emit_db)
    in_specs = [seq(bk, True), seq(bk, True), seq(dv, False), seq(dv, False), *dspecs,
                *summary_specs(H, S, bk, dv, True)]
    # Refs the calls below do not pass are None: the dq kernel's trailing (db, states) outputs,
    # the dk kernel's states input (after q, k, v, dO, the decay refs and the summaries) and its
    # trailing (db, anchors) outputs.
    dq_kernel = absent_refs(with_decay_refs(
        functools.partial(_dq_kernel, **common, split=split, anchor=anchor), 4, has_decay),
        2 - emit_db - stores)
    dq = dk_ = dv_ = ds0 = None
    dbq = dbk = ()
    states = anchors = None
    if "dq" in parts or stores:
        dq, *dbq = pl.pallas_call(
            dq_kernel, grid=(B * H, S, nk), in_specs=in_specs,
            out_specs=out_specs + [states_spec] * stores,
            out_shape=out_shapes + [states_shape] * stores, compiler_params=params,
            interpret=interpret, name="lasp2_chunk_attention_bwd_dq",
        )(q, k, v, do, *dargs, s0, m, a)
        if stores:
            *dbq, states = dbq
    dk_kernel = absent_refs(with_decay_refs(
        absent_refs(functools.partial(_dk_kernel, **common, split=split, anchor=anchor), 1 - stores,
                     position=10), 4, has_decay), 2 - emit_db - anchored)
    if "dk" in parts:
        dk_, *dbk = pl.pallas_call(
            dk_kernel, grid=(B * H, S, nk), in_specs=in_specs + [states_spec] * stores,
            out_specs=out_specs + [anchors_spec] * anchored,
            out_shape=out_shapes + [anchors_shape] * anchored, compiler_params=params,
            interpret=interpret, name="lasp2_chunk_attention_bwd_dk",
        )(q, k, v, do, *dargs, dst, dm, a, *([states] if stores else []))
        if anchored:
            *dbk, anchors = dbk
            anchors = (jnp.sum(anchors, axis=2)[..., :n_states], anchor)

    vcol = pl.BlockSpec((None, L, None, bv), lambda bh, s, j: (bh // H, s, bh % H, j))
    dargs_v, dspecs_v = decay_operands(bf, cnt, L, H, dk, fast)
    dv_kernel = with_decay_refs(
        functools.partial(_dv_kernel, **common, dk=dk, dim_slice=min(dim_slice, dk)), 3,
        has_decay)
    if "dv" in parts:
        dv_, ds0 = pl.pallas_call(
            dv_kernel, grid=(B * H, S, nv),
            in_specs=[seq(dk, False), seq(dk, False), vcol, *dspecs_v,
                      *summary_specs(H, S, dk, bv, row_block=False)],
            out_specs=[vcol, pl.BlockSpec((None, None, dk, bv),
                                          lambda bh, s, j: (bh // H, bh % H, 0, j))],
            out_shape=[jax.ShapeDtypeStruct((B, T, H, dv), v.dtype),
                       jax.ShapeDtypeStruct((B, H, dk, dv), _f32)],
            compiler_params=params, interpret=interpret, name="lasp2_chunk_attention_bwd_dv",
        )(q, k, do, *dargs_v, dst, dm, a)
    return dq, dk_, dv_, (dbq[0] if dbq else None), (dbk[0] if dbk else None), ds0, anchors
