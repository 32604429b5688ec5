"""Pallas backend: chunked linear attention as Triton kernels on GPU (interpret mode elsewhere).

Same signatures and semantics as :mod:`lasp2_jax.kernels.xla`. Inside one device the sequence
of each (batch, head) is split into segments that run as separate programs, which is LASP-2
(DESIGN.md §1) applied across the programs of a device:

1. ``segment_summary``: each segment's state from zero, M_s, and its total decay A_s;
2. an exclusive scan over segments, ``(A1, M1) o (A2, M2) = (A1 A2, A2 M1 + M2)``, gives the
   state entering each segment (from the initial state);
3. ``forward_outputs``: each segment's outputs, chunk by chunk, from its incoming state.

The backward mirrors it: summaries of the reverse recurrence, a reverse scan for the cotangent
of the state leaving each segment, then the dq / dk / dv kernels. Few (batch * heads) still
fill the GPU: B=1, H=16 gets 16 segments per head.

A per-dimension decay (GLA) takes the prescaled kernels of :mod:`pallas_prescaled`, with the
decays folded into q and k before the chunk loops, wherever no chunk's decay could overflow
the folded operands; the exact kernels of pallas_forward / pallas_backward otherwise.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lasp2_jax.compat import dense_cotangent, unwrap_primals
from lasp2_jax.decay import is_per_dim
from lasp2_jax.kernels import (
    pallas_backward,
    pallas_entry,
    pallas_forward,
    pallas_prescaled,
    pallas_scans,
)
from lasp2_jax.kernels.backends import Backend
from lasp2_jax.kernels.pallas_forward import NONE, PER_DIM, SCALAR, pow2

_f32 = jnp.float32

# The per-dimension form's exact path works on sub-chunks of pallas_forward.SUB_CHUNK.
PER_DIM_CHUNK = 64


@dataclasses.dataclass(frozen=True)
class Config:
    forward: pallas_forward.BlockSizes = pallas_forward.BlockSizes()
    backward: pallas_backward.BlockSizes = pallas_backward.BlockSizes()


DEFAULT_CONFIG = Config()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pad_axis(x, axis: int, size: int):
    if x is None or x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


@dataclasses.dataclass(frozen=True)
class _Plan:
    mode: str
    t: int
    dk_in: int
    dv_in: int
    chunk: int
    segments: int
    t_pad: int
    dk: int
    dv: int
    fwd: pallas_forward.BlockSizes
    bwd: pallas_backward.BlockSizes
    late_state: bool = False  # chunk_linear_attention's late_state


def _plan(B: int, T: int, H: int, Dk: int, Dv: int, mode: str, chunk_size: int,
          config: Config) -> _Plan:
    fwd = config.forward
    c = max(16, min(chunk_size, PER_DIM_CHUNK if mode == PER_DIM else chunk_size))
    c = pow2(c)
    fwd = dataclasses.replace(fwd, chunk=c)
    dk, dv = pow2(Dk), pow2(Dv)
    n = _cdiv(T, c)
    nv = dv // min(fwd.block_v, dv)
    s = 1
    while B * H * s * nv < fwd.min_programs and 2 * s <= n:
        s *= 2
    k = _cdiv(n, s)
    return _Plan(mode, T, Dk, Dv, c, s, s * k * c, dk, dv, fwd, config.backward)


def _decay_tables(g, plan: _Plan):
    """Chunk-local (bf, cnt) of the module docstring of pallas_forward, the segment totals and
    the per-segment flags of pallas_forward.chunk_loop.

    g: [B, T, H] or [B, T, H, Dk] padded. Returns bf, cnt ([B, H, T] for a scalar decay,
    [B, T, H, Dk] per dimension), A [B, H, S, Dk] (the factor exp(sum of g over the segment),
    exactly 0 across a reset) and fast [B, H, S] int32: 1 where the segment has no reset and
    every chunk's total is >= FACTOR_LOG_DECAY (scalar) or > SAFE_LOG_DECAY in every dimension.
    """
    B, T = g.shape[:2]
    c, S = plan.chunk, plan.segments
    n = T // c
    # Scalar tables come head-major, [B, H, T]: the kernels' decay loads are contiguous.
    bf, cnt = pallas_scans.decay_tables(g, c)
    t = 2 if g.ndim == 3 else 1  # the time axis of the tables

    def split(x, parts):  # the time axis as [parts, length // parts]
        return x.reshape(*x.shape[:t], parts, x.shape[t] // parts, *x.shape[t + 1:])

    # Segment totals from the chunks' last entries: sums over chunk totals, not over T.
    chunk_total = split(jnp.take(split(bf, n), -1, axis=t + 1), S)  # [B, (H,) S, K(, H, Dk)]
    any_reset = jnp.any(split(jnp.take(split(cnt, n), -1, axis=t + 1), S) > 0, axis=t + 1)
    a = jnp.where(any_reset, 0.0, jnp.exp(jnp.sum(chunk_total, axis=t + 1)))
    if g.ndim == 4:  # a [B, S, H, Dk]; the fast path in every chunk, per dimension
        fast = ~jnp.any(any_reset, axis=-1) & jnp.all(
            chunk_total > pallas_forward.SAFE_LOG_DECAY, axis=(2, 4))  # [B, S, H]
        return bf, cnt, jnp.moveaxis(a, 1, 2), jnp.moveaxis(fast, 1, 2).astype(jnp.int32)
    weak = jnp.all(chunk_total >= pallas_forward.FACTOR_LOG_DECAY, axis=3)
    fast = (weak & ~any_reset).astype(jnp.int32)  # [B, H, S]
    return bf, cnt, jnp.broadcast_to(a[..., None], (*a.shape, plan.dk)), fast


def _reverse_cumsum(x, c: int):
    """sum_{s >= t} x_s along axis 1 (length a multiple of c), in two levels: inside chunks
    of c, then over chunk totals (a single long cumsum is a quadratic reduce-window)."""
    B, T = x.shape[:2]
    rest = x.shape[2:]
    xc = jnp.flip(x.reshape(B, T // c, c, *rest), (1, 2))
    inner = jnp.cumsum(xc, axis=2)
    totals = jnp.cumsum(inner[:, :, -1:], axis=1)
    before = jnp.concatenate([jnp.zeros_like(totals[:, :1]), totals[:, :-1]], axis=1)
    return jnp.flip(inner + before, (1, 2)).reshape(x.shape)


def _anchored_sums(db, anchors, group: int, plan: _Plan):
    """The anchored form's decay gradient (pallas_forward.ANCHORED_DG_MODES): in each group of
    `group` chunks of a segment, dg_t = X - sum_{group start <= s < t} dL/db_s, where X, the
    pairs crossing the group's first position, is the group's anchor term.

    db: [B, H, T] dL/db = q dq - k dk; anchors: [B, H, S, n_groups]. Returns dg [B, T, H].
    (A few MB: XLA's cumulative sums do. GLA's per-dimension sums, [B, T, H, Dk], run inside
    its dk kernel, pallas_prescaled.ANCHORED_DG.)"""
    B, H, T = db.shape
    S, n_groups = anchors.shape[2:]
    span = group * plan.chunk
    db = db.reshape(B, H, S, T // S)
    db = _pad_axis(db, 3, n_groups * span).reshape(B, H, S, n_groups, span)
    dg = anchors[..., None] - (jnp.cumsum(db, axis=-1) - db)
    dg = dg.reshape(B, H, S, n_groups * span)[..., :T // S].reshape(B, H, T)
    return jnp.moveaxis(dg, 1, 2)


def _pad_keys(x, plan: _Plan):
    """q or k [B, T, H, Dk] padded with zeros to the plan's T and Dk."""
    return _pad_axis(_pad_axis(x, 1, plan.t_pad), 3, plan.dk)


def _pad_decay(g, plan: _Plan):
    """The log decays padded to the plan's T (zeros: no decay) and, per dimension, Dk."""
    if g is None:
        return None
    g = _pad_axis(g, 1, plan.t_pad)
    if g.ndim == 4 and g.shape[3] != plan.dk:
        # The padded key dimensions repeat the last one (their q and k are 0): a token that
        # resets every dimension still does, so packed documents keep the prescaled kernels
        # (pallas_prescaled.all_chunks_safe).
        g = jnp.pad(g, [(0, 0)] * 3 + [(0, plan.dk - g.shape[3])], mode="edge")
    return g


def _pad_values(x, plan: _Plan):
    """v or dO [B, T, H, Dv] padded with zeros to the plan's T and Dv."""
    return _pad_axis(_pad_axis(x, 1, plan.t_pad), 3, plan.dv)


def _pad_state(s, plan: _Plan):
    """A state or its cotangent [B, H, Dk, Dv] padded with zeros to the plan's Dk and Dv."""
    return _pad_axis(_pad_axis(s, 2, plan.dk), 3, plan.dv)


def _pad_operands(q, k, v, g, s0, plan: _Plan):
    """q, k, v, g and s0 padded to the plan's T, Dk and Dv (zeros: no effect on the rest)."""
    return (_pad_keys(q, plan), _pad_keys(k, plan), _pad_values(v, plan), _pad_decay(g, plan),
            _pad_state(s0, plan))


def _prepare(q, k, v, g, s0, plan: _Plan):
    q, k, v, g, s0 = _pad_operands(q, k, v, g, s0, plan)
    if g is None:
        a = jnp.ones((q.shape[0], q.shape[2], plan.segments, plan.dk), _f32)
        return q, k, v, None, None, None, a, s0
    bf, cnt, a, fast = _decay_tables(g, plan)
    return q, k, v, bf, cnt, fast, a, s0


def _segment_summary(k, v, bf, cnt, fast, plan: _Plan, decay_grad: bool):
    """The per-segment summaries [B, H, S, Dk, Dv] of padded k, v (the summary kernel)."""
    return pallas_forward.segment_summary(
        k, v, bf, cnt, fast, mode=plan.mode, num_segments=plan.segments, heads=k.shape[2],
        block_sizes=plan.fwd, reverse=False, side="k", scale=1.0, decay_grad=decay_grad)


def _backward_summaries(q, do, bf, cnt, fast, plan: _Plan, scale: float, decay_grad: bool):
    """The per-segment backward summaries [B, H, S, Dk, Dv] of padded q, do: what each
    segment's outputs send to the state entering it. One definition for the attention's
    backward and state_gradient, whose calls XLA must find identical to keep one."""
    return pallas_forward.segment_summary(
        q, do, bf, cnt, fast, mode=plan.mode, num_segments=plan.segments, heads=q.shape[2],
        block_sizes=plan.fwd, reverse=True, side="q", scale=scale, decay_grad=decay_grad)


def _forward(q, k, v, g, s0, m_given, scale: float, plan: _Plan, decay_grad: bool):
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    q, k, v, bf, cnt, fast, a, s0 = _prepare(q, k, v, g, s0, plan)
    if plan.segments > 1:
        m = (_segment_summary(k, v, bf, cnt, fast, plan, decay_grad) if m_given is None
             else m_given)
    else:
        m = jnp.zeros((B, H, 1, plan.dk, plan.dv), _f32)
    # A late state enters after the kernels (the exact per-dimension path takes it at once).
    late = plan.late_state and plan.mode != PER_DIM
    o, final = pallas_forward.forward_outputs(q, k, v, bf, cnt, fast,
                                              jnp.zeros_like(s0) if late else s0, m, a,
                                              mode=plan.mode, scale=scale, block_sizes=plan.fwd,
                                              out_dtype=q.dtype, decay_grad=decay_grad)
    if late:
        rows = None if bf is None else pallas_entry.scalar_factors(bf, cnt, plan.chunk)
        o, final = _enter_late_state(o, final, q, s0, a, m, scale, plan, rows=rows)
    residuals = (q, k, v, bf, cnt, fast, a, s0, m, final)
    return o[:, :T, :, :Dv], final[:, :, :Dk, :Dv], residuals


def _enter_late_state(o_zero, final_zero, x, s0, a, m, scale: float, plan: _Plan, **factors):
    """The outputs and final state from the incoming state s0 [B, H, Dk, Dv], given those from
    a zero state (padded): o_zero plus s0's term (pallas_entry), which waits for s0 alone.
    x: q, or GLA's qe; a, m: the segment decays and summaries; factors: the decay of x
    (pallas_entry.add_state_term)."""
    # Both materialised before the term: a collective that produces s0 completes after the
    # kernels instead of ahead of them (as lasp2's overlapped form orders its own).
    s0, o_zero = jax.lax.optimization_barrier((s0, o_zero))
    o = pallas_entry.add_state_term(o_zero, x, s0, scale=scale, chunk=plan.chunk, **factors)
    if plan.segments > 1:
        return o, pallas_forward.fold_summaries(s0, a, m)
    return o, a[:, :, 0, :, None] * s0 + final_zero  # one segment: its kernel's final state


def _any_forward(q, k, v, g, s0, m_given, scale: float, plan: _Plan, decay_grad: bool,
                 for_backward: bool):
    """:func:`_forward`, or :func:`_per_dim_forward` where the plan takes the prescaled
    kernels; for_backward: the residuals will be used (a custom VJP's forward)."""
    if _prescaled(plan):
        return _per_dim_forward(q, k, v, g, s0, m_given, scale, plan, decay_grad, for_backward)
    return _forward(q, k, v, g, s0, m_given, scale, plan, decay_grad)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _chunk_attention(q, k, v, g, s0, m_given, scale, plan):
    o, final, _ = _any_forward(q, k, v, g, s0, m_given, scale, plan, decay_grad=False,
                               for_backward=False)
    return o, final


def _chunk_attention_fwd(q, k, v, g, s0, m_given, scale, plan):
    # symbolic_zeros: the arrays arrive as CustomVJPPrimal. A decay that is not differentiated
    # (Lightning's and RetNet's fixed decays) spares the backward its decay-gradient work.
    (q, k, v, g, s0, m_given), perturbed = unwrap_primals(q, k, v, g, s0, m_given)
    decay_grad = perturbed[3]
    o, final, res = _any_forward(q, k, v, g, s0, m_given, scale, plan, decay_grad,
                                 for_backward=True)
    # The flag travels in the residuals' structure: () when the decay gradient is wanted.
    return (o, final), (res, () if decay_grad else None)


def _backward(res, do, dst, scale: float, plan: _Plan, decay_grad: bool):
    """dq, dk, dv, dg (None without decay_grad) and ds0 of the exact kernels, from the
    residuals of :func:`_forward` and the dense cotangents of o and the final state."""
    q, k, v, bf, cnt, fast, a, s0, m, final = res
    T, Dk, Dv = plan.t, plan.dk_in, plan.dv_in
    do = _pad_values(do.astype(q.dtype), plan)
    dst = _pad_state(dst.astype(_f32), plan)
    if plan.segments > 1:
        dm = _backward_summaries(q, do, bf, cnt, fast, plan, scale, decay_grad)
    else:
        dm = jnp.zeros_like(m)
    dq, dk, dv, dbq, dbk, ds0, anchors = pallas_backward.backward(
        q, k, v, do, bf, cnt, fast, s0, m, dst, dm, a, mode=plan.mode, scale=scale,
        chunk=plan.chunk, block_sizes=plan.bwd, dim_slice=plan.fwd.dim_slice,
        decay_grad=decay_grad)
    dg = None
    if decay_grad and plan.mode in pallas_forward.CROSSING_DG_MODES:
        # the crossing form: nothing left to sum up
        dg = jnp.moveaxis(jnp.sum(dbq + dbk, axis=2), 1, 2)[:, :T]
    elif anchors is not None:
        dg = _anchored_sums(jnp.sum(dbq - dbk, axis=2), *anchors, plan)[:, :T]
    elif decay_grad:
        # dL/db_t = q_t dq_t - k_t dk_t, plus sum_e S_T dS_T at the last token; dg_t sums
        # dL/db over s >= t (see pallas_backward's docstring). The last token's k dk nearly
        # cancels the final-state term: adding that term first, at the last token, keeps the
        # large pair out of the running sum (added afterwards it doubled the f32 dg error).
        final_term = jnp.sum(final * dst, axis=-1)  # [B, H, Dk]
        if plan.mode == SCALAR:
            db = jnp.moveaxis(jnp.sum(dbq - dbk, axis=2), 1, 2)  # [B, T, H]
            db = db.at[:, -1].add(jnp.sum(final_term, axis=-1))
            dg = _reverse_cumsum(db, plan.chunk)[:, :T]
        else:
            dg = pallas_scans.reverse_decay_sums(dbq, dbk, final_term, plan.chunk)
            dg = dg[:, :T, :, :Dk]
    return dq[:, :T, :, :Dk], dk[:, :T, :, :Dk], dv[:, :T, :, :Dv], dg, ds0[:, :, :Dk, :Dv]


# --------------------------------------------------------------------------------------------
# A per-dimension decay: the prescaled kernels (pallas_prescaled) where every chunk allows
# them, the exact kernels otherwise. The choice is one lax.switch per call on the decays'
# values, among three paths: the exact kernels, the prescaled ones, and the prescaled ones with
# the document masks of packed documents (whole tokens reset), compiled apart so that a call
# without resets runs no mask. Read when a call is traced; False: the exact kernels always (for
# comparison in benchmarks).
PRESCALED_PER_DIM = True
EXACT, PRESCALED, PRESCALED_RESETS = 0, 1, 2


def _per_dim_path(ad, cnt, chunk: int):
    """EXACT, PRESCALED or PRESCALED_RESETS as a traced int32, from the ad and cnt of
    :func:`pallas_prescaled.prescale`."""
    resets = jnp.any(pallas_scans.chunk_ends(cnt, chunk) > 0.0)
    return jnp.where(pallas_prescaled.all_chunks_safe(ad),
                     jnp.where(resets, PRESCALED_RESETS, PRESCALED), EXACT).astype(jnp.int32)


def _on_path(path, cnt, exact, prescaled):
    """exact(cnt) or prescaled(counts) on the path of :func:`_per_dim_path`, with counts None
    on PRESCALED (no reset in the call: kernels without the document masks) and cnt on
    PRESCALED_RESETS."""
    return jax.lax.switch(path, [exact, lambda _: prescaled(None), prescaled], cnt)


def _prescaled(plan: _Plan) -> bool:
    return plan.mode == PER_DIM and PRESCALED_PER_DIM


def _per_dim_forward(q, k, v, g, s0, m_given, scale: float, plan: _Plan, decay_grad: bool,
                     for_backward: bool = True):
    """:func:`_forward` for a per-dimension decay. Residuals: the unpadded inputs, the
    prescaled operands (exp(b) among them only for_backward), the path taken (_per_dim_path),
    the summaries and the final state."""
    T, Dk, Dv = plan.t, plan.dk_in, plan.dv_in
    vp, s0p = _pad_values(v, plan), _pad_state(s0, plan)
    qe, ke, eb, ad, cnt, path = _per_dim_prescale(q, k, g, plan, for_backward)

    def prescaled(cnt):  # None: no reset in the call
        a = pallas_prescaled.segment_decays(ad, cnt, plan.segments)
        if m_given is not None:
            m = m_given
        elif plan.segments > 1:
            m = _prescaled_summaries(ke, vp, ad, cnt, plan)
        else:  # one segment: its program needs no summary
            m = jnp.zeros((*a.shape[:3], plan.dk, plan.dv), _f32)
        o, final = pallas_prescaled.forward_outputs(
            qe, ke, vp, ad, cnt, jnp.zeros_like(s0p) if plan.late_state else s0p, m, a,
            chunk=plan.chunk, scale=scale, block_sizes=plan.fwd, out_dtype=q.dtype)
        if plan.late_state:
            o, final = _enter_late_state(
                o, final, qe, s0p, a, m, scale, plan,
                cols=pallas_entry.per_dim_factors(ad, cnt), cnt=cnt)
        elif plan.segments > 1:
            final = pallas_forward.fold_summaries(s0p, a, m)
        return o[:, :T, :, :Dv], final[:, :, :Dk, :Dv], m

    def exact(_):
        o, final, res = _forward(q, k, v, g, s0, m_given, scale, plan, decay_grad)
        return o, final, res[8]

    o, final, m = _on_path(path, cnt, exact, prescaled)
    return o, final, (q, k, v, g, s0, qe, ke, eb, ad, cnt, path, m, final)


def _prescaled_summaries(x, y, ad, cnt, plan: _Plan, *, reverse: bool = False,
                         scale: float = 1.0):
    """pallas_prescaled.segment_summaries over the plan's segments: forward (x = ke, y = v) or
    backward (reverse, x = qe, y = dO), [B, H, S, Dk, Dv]. ad, cnt: of
    :func:`pallas_prescaled.prescale`, cnt None without resets; y padded."""
    return pallas_prescaled.segment_summaries(x, y, ad, cnt, segments=plan.segments,
                                              chunk=plan.chunk, block_sizes=plan.fwd,
                                              reverse=reverse, scale=scale)


def _per_dim_prescale(q, k, g, plan: _Plan, for_backward: bool = True):
    """qe, ke, eb, ad, cnt of the padded q, k and g and the path (:func:`_per_dim_path`) the
    attention takes on them; eb (None without for_backward) is exp(b) for the backward. The
    same operations as the attention's forward on the same arrays, so that where both are in
    one program XLA keeps one prescale kernel: segment_summaries and state_gradient take the
    default, as a differentiated attention's forward does (LASP-2 always takes the attention's
    VJP)."""
    qe, ke, eb, ad, cnt = pallas_prescaled.prescale(_pad_keys(q, plan), _pad_keys(k, plan),
                                                    _pad_decay(g, plan), plan.chunk,
                                                    with_eb=for_backward)
    return qe, ke, eb, ad, cnt, _per_dim_path(ad, cnt, plan.chunk)


def _per_dim_backward(res, do, dst, scale: float, plan: _Plan, decay_grad: bool):
    """:func:`_backward` for a per-dimension decay, on the path its forward took."""
    q, k, v, g, s0, qe, ke, eb, ad, cnt, path, m, final = res
    T, Dk, Dv = plan.t, plan.dk_in, plan.dv_in
    final = _pad_state(final, plan)

    def prescaled(cnt):  # None: no reset in the call
        vp, s0p = _pad_values(v, plan), _pad_state(s0, plan)
        dop = _pad_values(do.astype(q.dtype), plan)
        dstp = _pad_state(dst.astype(_f32), plan)
        a = pallas_prescaled.segment_decays(ad, cnt, plan.segments)
        if plan.segments > 1:
            dm = _prescaled_summaries(qe, dop, ad, cnt, plan, reverse=True, scale=scale)
        else:
            dm = jnp.zeros_like(m)
        dq, dk, dv, dg, ds0 = pallas_prescaled.backward(
            qe, ke, vp, dop, eb, ad, cnt, s0p, m, final, dstp, dm, a, chunk=plan.chunk,
            scale=scale, block_sizes=plan.bwd, decay_grad=decay_grad)
        if dg is not None:
            dg = dg[:, :T, :, :Dk]
        return (dq[:, :T, :, :Dk], dk[:, :T, :, :Dk], dv[:, :T, :, :Dv], dg,
                ds0[:, :, :Dk, :Dv])

    def exact(_):
        qp, kp, vp, bf, cnt, fast, a, s0p = _prepare(q, k, v, g, s0, plan)
        return _backward((qp, kp, vp, bf, cnt, fast, a, s0p, m, final), do, dst, scale, plan,
                         decay_grad)

    return _on_path(path, cnt, exact, prescaled)


def _chunk_attention_bwd(scale, plan, residuals, cts):
    res, decay_grad = residuals[0], residuals[1] is not None
    do, dst = (dense_cotangent(ct) for ct in cts)
    backward = _per_dim_backward if _prescaled(plan) else _backward
    # given summaries are a function of k, v and g, whose cotangents above are complete
    return (*backward(res, do, dst, scale, plan, decay_grad), None)


_chunk_attention.defvjp(_chunk_attention_fwd, _chunk_attention_bwd, symbolic_zeros=True)
# Called through jit: eager shard_map refuses a custom_vjp with symbolic zeros, a jit is fine.
_chunk_attention_jit = jax.jit(_chunk_attention, static_argnums=(6, 7))


def _mode(log_decay) -> str:
    if log_decay is None:
        return NONE
    return PER_DIM if is_per_dim(log_decay) else SCALAR


def chunk_linear_attention(q, k, v, log_decay=None, *, scale: float, chunk_size: int = 64,
                           initial_state=None, config: Config = DEFAULT_CONFIG,
                           segment_summaries=None, late_state: bool = False):
    """Causal linear attention over one device's segment, as Pallas kernels.

    Args:
      q, k: [B, T, H, Dk] (kv heads already expanded to H); v: [B, T, H, Dv]; bf16 or f32.
      log_decay: None | [B, T, H] | [B, T, H, Dk], float32, <= 0 (-inf or -1e30 resets).
      scale: multiplies q.
      chunk_size: C (rounded up to a power of two >= 16; at most 16 with a per-dimension decay).
        T need not be a multiple; Dk and Dv need not be powers of two (padded inside).
      initial_state: [B, H, Dk, Dv] float32 or None (zeros).
      config: block sizes of the kernels.
      segment_summaries: the first output of :func:`segment_summaries` for the same k, v,
        log_decay, chunk_size and config, which this call then does not compute again.
      late_state: the kernels run from a zero state and initial_state's term is added after
        them by a pass of its own (pallas_entry), so that they need not wait for it: LASP-2
        overlaps the all-gather that produces it with them. The same values and gradients.
    Returns:
      o [B, T, H, Dv] in q's dtype, and the final state [B, H, Dk, Dv] float32.
    """
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    mode = _mode(log_decay)
    plan = dataclasses.replace(_plan(B, T, H, Dk, Dv, mode, chunk_size, config),
                               late_state=late_state and initial_state is not None)
    s0 = (jnp.zeros((B, H, Dk, Dv), _f32) if initial_state is None
          else initial_state.astype(_f32))
    g = None if log_decay is None else log_decay.astype(_f32)
    k = k.astype(q.dtype)
    v = v.astype(q.dtype)
    want = (B, H, plan.segments, plan.dk, plan.dv)
    if segment_summaries is not None and tuple(segment_summaries.shape) != want:
        raise ValueError(f"segment_summaries has shape {tuple(segment_summaries.shape)}; this "
                         f"call's segments need {want}: pass those of segment_summaries() for "
                         "the same k, v, log_decay, chunk_size and config")
    return _chunk_attention_jit(q, k, v, g, s0, segment_summaries, float(scale), plan)


def _summary_by_attention(k, v, g, config):
    """M as the final state of the attention from zero with q = 0 (used for the backward)."""
    return chunk_linear_attention(jnp.zeros_like(k), k, v, g, scale=1.0, config=config)[1]


def _summaries_and_fold(k, v, g, config, decay_grad: bool, chunk_size: int = 64):
    """The summary kernel per segment ([B, H, S, Dk, Dv], padded) and M [B, H, Dk, Dv], their
    fold over the segments."""
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    plan = _plan(B, T, H, Dk, Dv, _mode(g), chunk_size, config)
    s0 = jnp.zeros((B, H, Dk, Dv), _f32)
    k, _, v, bf, cnt, fast, a, s0 = _prepare(k, k, v.astype(k.dtype), g, s0, plan)
    m = _segment_summary(k, v, bf, cnt, fast, plan, decay_grad)
    return m, pallas_forward.fold_summaries(s0, a, m)[:, :, :Dk, :Dv]


def _summary_value(k, v, g, config, decay_grad: bool):
    """M [B, H, Dk, Dv]: the summary kernel per segment, folded over the segments."""
    return _summaries_and_fold(k, v, g, config, decay_grad)[1]


def segment_summaries(k, v, log_decay=None, *, q=None, chunk_size: int = 64,
                      decay_grad: bool = False, config: Config = DEFAULT_CONFIG):
    """The segment summaries that :func:`chunk_linear_attention` computes first, to compute
    them once where the caller also needs their fold (LASP-2 gathers it).

    Args:
      k: [B, T, H, Dk]; v: [B, T, H, Dv]; log_decay: None | [B, T, H] | [B, T, H, Dk].
      q: the queries of the attention call that will take these summaries back, or None. With
        a per-dimension decay the summaries then come from the prescaled operands of that
        call (pallas_prescaled), by the same kernel call on the same arrays, which XLA keeps
        once where both are in one program; without q they take the exact kernels.
      chunk_size, config: those the attention will be called with.
      decay_grad: the attention's log-decay gradient will be taken (the summaries then take
        the operands the attention's own would).
    Returns:
      the summaries (pass them as the attention's ``segment_summaries``) and M [B, H, Dk, Dv]
      float32, the state after the last token from a zero state. Forward values only: the
      inputs pass through stop_gradient.
    """
    k, v = jax.lax.stop_gradient((k, v.astype(k.dtype)))
    g = None if log_decay is None else jax.lax.stop_gradient(log_decay.astype(_f32))
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    plan = _plan(B, T, H, Dk, Dv, _mode(g), chunk_size, config)
    if q is None or not _prescaled(plan):
        return _summaries_and_fold(k, v, g, config, decay_grad, chunk_size)
    # As chunk_linear_attention casts them: k and v in q's dtype.
    q = jax.lax.stop_gradient(q)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    _, ke, _, ad, cnt, path = _per_dim_prescale(q, k, g, plan)
    zero = jnp.zeros((B, H, plan.dk, plan.dv), _f32)

    def prescaled(cnt):  # None: no reset in the call
        m = _prescaled_summaries(ke, _pad_values(v, plan), ad, cnt, plan)
        a = pallas_prescaled.segment_decays(ad, cnt, plan.segments)
        return m, pallas_forward.fold_summaries(zero, a, m)[:, :, :Dk, :Dv]

    def exact(_):
        return _summaries_and_fold(k, v, g, config, decay_grad, chunk_size)

    return _on_path(path, cnt, exact, prescaled)


def state_gradient(q, do, log_decay=None, *, k=None, scale: float, chunk_size: int = 64,
                   decay_grad: bool = False, config: Config = DEFAULT_CONFIG):
    """The cotangent that the outputs' cotangent ``do`` sends to the state entering the
    sequence, ``scale * sum_i (q_i exp(b_i))^T do_i`` ([B, H, Dk, Dv] float32), from the same
    backward summary kernel, on the same operands, as the backward of
    :func:`chunk_linear_attention` with these arguments: where both are in one program, XLA
    keeps one of the two identical kernel calls. (LASP-2 gathers this cotangent before that
    backward can run.)

    Args:
      q: [B, T, H, Dk]; do: [B, T, H, Dv]; log_decay: None | [B, T, H] | [B, T, H, Dk].
      k: the keys of that attention call, or None. A per-dimension decay then takes the
        prescaled operands of the attention's forward (pallas_prescaled), by the same prescale
        call, which XLA keeps once; without k it takes the exact kernels. Either way its
        summary kernel runs apart from the attention's backward, which picks its kernels
        inside a branch of its own.
      scale, chunk_size, config: those of the attention; decay_grad: whether its log-decay
        gradient is taken.
    Forward values only: the inputs pass through stop_gradient.
    """
    q, do = jax.lax.stop_gradient((q, do.astype(q.dtype)))
    g = None if log_decay is None else jax.lax.stop_gradient(log_decay.astype(_f32))
    B, T, H, Dk = q.shape
    Dv = do.shape[-1]
    plan = _plan(B, T, H, Dk, Dv, _mode(g), chunk_size, config)
    zero = jnp.zeros((B, H, plan.dk, plan.dv), _f32)

    def exact(_):
        # The attention's forward pads q, its backward pads do: the same ops on the same
        # arrays.
        qp, _, dop, bf, cnt, fast, a, _ = _prepare(q, q, do, g, zero[:, :, :Dk, :Dv], plan)
        dm = _backward_summaries(qp, dop, bf, cnt, fast, plan, scale, decay_grad)
        return pallas_forward.fold_summaries(zero, a, dm, reverse=True)[:, :, :Dk, :Dv]

    if k is None or not _prescaled(plan):
        return exact(None)
    qe, _, _, ad, cnt, path = _per_dim_prescale(
        q, jax.lax.stop_gradient(k).astype(q.dtype), g, plan)

    def prescaled(cnt):  # None: no reset in the call
        dm = _prescaled_summaries(qe, _pad_values(do, plan), ad, cnt, plan, reverse=True,
                                  scale=scale)
        a = pallas_prescaled.segment_decays(ad, cnt, plan.segments)
        return pallas_forward.fold_summaries(zero, a, dm, reverse=True)[:, :, :Dk, :Dv]

    return _on_path(path, cnt, exact, prescaled)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _summary(k, v, g, config):
    return _summary_value(k, v, g, config, decay_grad=False)


def _summary_fwd(k, v, g, config):
    (k, v, g), perturbed = unwrap_primals(k, v, g)  # symbolic_zeros: see _chunk_attention_fwd
    decay_grad = perturbed[2]
    return _summary_value(k, v, g, config, decay_grad), (k, v, g, () if decay_grad else None)


def _summary_bwd(config, res, dm):
    # The backward of the summary is the dk / dv part of the attention's backward with a zero
    # output cotangent: reuse it (its forward output is recomputed and dropped).
    k, v, g, decay_grad = res
    dm = dense_cotangent(dm)
    if decay_grad is None:  # a fixed decay: close over it, so no decay gradient is computed
        _, vjp = jax.vjp(lambda k_, v_: _summary_by_attention(k_, v_, g, config), k, v)
        return (*vjp(dm), None)
    _, vjp = jax.vjp(lambda k_, v_, g_: _summary_by_attention(k_, v_, g_, config), k, v, g)
    return vjp(dm)


_summary.defvjp(_summary_fwd, _summary_bwd, symbolic_zeros=True)
_summary_jit = jax.jit(_summary, static_argnums=(3,))  # see _chunk_attention_jit


def state_summary(k, v, log_decay=None, *, config: Config = DEFAULT_CONFIG):
    """The LASP-2 summary of a segment: its final state from zero, and its total log decay.

    Args:
      k: [B, T, H, Dk]; v: [B, T, H, Dv]; log_decay: None | [B, T, H] | [B, T, H, Dk] (f32).
    Returns:
      M [B, H, Dk, Dv] float32 and the total log decay [B, H, Dk] (see xla.state_summary).
    """
    B, T, H, Dk = k.shape
    g = None if log_decay is None else log_decay.astype(_f32)
    m = _summary_jit(k, v, g, config)
    if g is None:
        total = jnp.zeros((B, H, Dk), _f32)
    else:
        total = jnp.sum(g, axis=1)
        if not is_per_dim(g):
            total = jnp.broadcast_to(total[..., None], (B, H, Dk))
    return m, total


def full_linear_attention(q, k, v, *, scale: float, initial_state=None):
    """Bidirectional linear attention: o_t = scale * q_t (S_0 + sum_s k_s^T v_s).

    Two matmuls per head that XLA already runs at speed; shapes as in
    :func:`chunk_linear_attention`. Returns o and the total state.
    """
    state = jnp.einsum("bthd,bthe->bhde", k.astype(_f32), v.astype(_f32))
    if initial_state is not None:
        state = state + initial_state.astype(_f32)
    o = scale * jnp.einsum("bthd,bhde->bthe", q.astype(_f32), state)
    return o.astype(q.dtype), state


BACKEND = Backend("pallas", chunk_linear_attention, state_summary, full_linear_attention,
                  segment_summaries, state_gradient, late_state=True)
