"""LASP-2 for linear attention, in local view (call inside ``shard_map`` over ``axis_name``).

Forward on rank r (DESIGN.md §1): all-gather the packed summaries (M_r, Gamma_r) once; the
exclusive scan over ranks gives the incoming state S_r. Two forms (``lasp2_causal``'s
``overlap``, chosen by :func:`gather_overlap_pays`):
- overlapped, as in the paper: the local chunked attention runs from a zero state (its final
  state is M_r) while the gather is in flight, then one [L, Dk] x [Dk, Dv] product per head
  adds S_r's contribution (:func:`enter_state`). A backend with ``late_state`` (Pallas) does
  this inside its attention call: the summary first, its kernels from a zero state under the
  gather, then a kernel of its own for S_r's term; its backward is the state-first one;
- state first: the summary alone, the gather, then the attention kernels start from S_r.
Backward (custom VJP): all-gather dS_r once, reverse-scan it into dM_r, and pull both
cotangents through the local computation. Where the attention took S_r (state first, or
late_state) a backend with a ``state_gradient`` gives dS_r by the kernel call that the local
backward makes anyway.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lasp2_jax.compat import dense_cotangent, matmul_operand_dtype, unwrap_primals
from lasp2_jax.decay import inclusive_cumsum, is_per_dim
from lasp2_jax.parallel.scan import incoming_state, outgoing_cotangent

_f32 = jnp.float32


def decayed_queries(q, g):
    """exp(b_i) * q_i with b_i = sum_{t<=i} g_t over the segment: [B, L, H, Dk] in q's dtype
    (a matmul operand; the factor is formed in float32)."""
    if g is None:
        return q
    b = inclusive_cumsum(g, axis=1)
    e = jnp.exp(b) if is_per_dim(g) else jnp.exp(b)[..., None]
    return (q.astype(_f32) * e).astype(q.dtype)


def total_log_decay(g, shape):
    """Gamma = the sum of g over the segment as [B, H, Dk] (zeros without decay)."""
    if g is None:
        return jnp.zeros(shape, _f32)
    total = jnp.sum(g.astype(_f32), axis=1)
    return total if is_per_dim(g) else jnp.broadcast_to(total[..., None], shape)


def total_decay(g, shape):
    """A = exp(Gamma) as [B, H, Dk] (ones without decay)."""
    return jnp.exp(total_log_decay(g, shape))


@jax.custom_vjp
def state_product(x, s):
    """x [B, L, H, Dk] times the state s [B, H, Dk, Dv] (float32) per head: [B, L, H, Dv]
    float32. s enters the matmul in x's dtype with float32 accumulation (on GPU; see
    compat.matmul_operand_dtype), and so do the two products of the backward, where autodiff
    would take them with the float32 cotangent, as float32 matmuls."""
    dt = matmul_operand_dtype(x.dtype)
    return jnp.einsum("blhd,bhde->blhe", x.astype(dt), s.astype(dt),
                      preferred_element_type=_f32)


def _state_product_fwd(x, s):
    return state_product(x, s), (x, s)


def state_cotangent(x, ct):
    """sum over tokens of x^T ct per head: x [B, L, H, Dk], ct [B, L, H, Dv] -> [B, H, Dk, Dv]
    float32, both operands in x's matmul dtype (compat.matmul_operand_dtype)."""
    dt = matmul_operand_dtype(x.dtype)
    return jnp.einsum("blhd,blhe->bhde", x.astype(dt), ct.astype(dt),
                      preferred_element_type=_f32)


def _state_product_bwd(res, ct):
    x, s = res
    dt = matmul_operand_dtype(x.dtype)
    dx = jnp.einsum("blhe,bhde->blhd", ct.astype(dt), s.astype(dt), preferred_element_type=_f32)
    return dx.astype(x.dtype), state_cotangent(x, ct)


state_product.defvjp(_state_product_fwd, _state_product_bwd)


def enter_state(o_zero, m, q, g, s_in, scale: float):
    """A rank's outputs and outgoing state from its zero-state attention and incoming state:
    ``o = o_zero + scale * (exp(b) q) S_in`` and ``S_out = diag(A) S_in + M``.

    o_zero [B, L, H, Dv]; m [B, H, Dk, Dv] the zero-state final state M; q [B, L, H, Dk];
    g None | [B, L, H] | [B, L, H, Dk]; s_in [B, H, Dk, Dv] float32.
    Returns o [B, L, H, Dv] (q's dtype) and S_out [B, H, Dk, Dv] float32.
    """
    o = o_zero.astype(_f32) + scale * state_product(decayed_queries(q, g), s_in)
    s_out = total_decay(g, s_in.shape[:3])[..., None] * s_in + m
    return o.astype(q.dtype), s_out


def gather_states(x, axis_name, splits: int = 1):
    """All-gather x [..., Dk, Dv'] over ``axis_name`` -> [W, ..., Dk, Dv'].

    ``splits`` > 1 sends it as that many gathers of Dk-row slices (the paper's Table 5
    ablation); 1, the default, is the single all-gather of the method.
    """
    if splits == 1:
        return jax.lax.all_gather(x, axis_name)
    pieces = jnp.array_split(x, splits, axis=-2)
    return jnp.concatenate([jax.lax.all_gather(p, axis_name) for p in pieces], axis=-2)


# Bandwidths of the cost model of gather_overlap_pays: HBM, and a slow link between hosts
# (the gather's worst case; NVLink inside a host is about 10x faster).
HBM_BYTES_PER_S = 3.0e12
LINK_BYTES_PER_S = 5.0e10


def gather_overlap_pays(world: int, shape_q, dv: int, itemsize: int,
                        late_state: bool = False) -> bool:
    """Whether to overlap the state gather with the local attention (True) or let the
    gathered incoming state enter the attention kernels (False).

    Overlap needs the incoming-state term as passes of its own over the local tokens (read
    exp(b) q and o_zero, write o, and about twice that in the backward); the other way the
    kernels take the state for free but wait for the gather (forward and backward, each W
    states). Measured on 2 H100 at 512K tokens per device, the overlap's extra pass took 5 ms
    of a 12.7 ms forward, while the gather, not overlapped, took 0.06 ms
    (benchmarks/results/sp_H100_sp2_final.json).
    late_state: the backend adds the term by one pass after its kernels and takes the
    state-first backward (Backend.late_state): overlap costs that pass and hides the forward's
    gather only. On an H100 at 16K tokens per device (H=16, D=128, bf16) it cost 0.08-0.12 ms
    of forward+backward over the state-first form, about 1.5 passes at the HBM rate
    (benchmarks/results/rank_local_H100_late_state_v3.json).
    The gather time assumes the slow link, so overlap wins where it could matter: short local
    segments and many ranks.
    """
    B, L, H, dk = shape_q
    one_pass = B * L * H * (dk + 2 * dv) * itemsize
    one_gather = world * B * H * dk * (dv + 1) * 4
    if late_state:
        return one_gather / LINK_BYTES_PER_S > 1.5 * one_pass / HBM_BYTES_PER_S
    return 2 * one_gather / LINK_BYTES_PER_S > 3 * one_pass / HBM_BYTES_PER_S


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10, 11))
def lasp2_causal(q, k, v, g, s0, axis_name, scale, chunk_size, backend, want_final,
                 gather_splits=1, overlap=None):
    """Causal LASP-2 on one rank. Returns (o [B, L, H, Dv], final state [B, H, Dk, Dv]).

    overlap: run the local attention from a zero state while the states are gathered and add
    the incoming state's term after (True), or gather first and start the local attention
    from the incoming state (False); None chooses by :func:`gather_overlap_pays`.

    The final state is the same on every rank; its cotangent is summed over ranks, which
    matches how ``shard_map`` transposes a replicated output. The initial state's cotangent
    is returned on rank 0 only, so summing over ranks gives the total.
    """
    out, _, _ = _lasp2_causal_forward(q, k, v, g, s0, axis_name, scale, chunk_size, backend,
                                      gather_splits, overlap)
    return out


def _lasp2_causal_fwd(q, k, v, g, s0, axis_name, scale, chunk_size, backend, want_final,
                      gather_splits, overlap):
    # symbolic_zeros: the arrays arrive as CustomVJPPrimal. A decay that is not differentiated
    # (Lightning's and RetNet's fixed decays) is closed over below, so the backends skip the
    # decay-gradient work.
    (q, k, v, g, s0), perturbed = unwrap_primals(q, k, v, g, s0)
    decay_grad = perturbed[3]
    out, pullback, decays = _lasp2_causal_forward(q, k, v, g, s0, axis_name, scale, chunk_size,
                                                  backend, gather_splits, overlap, decay_grad)
    # The flag travels in the residuals' structure: () when the decay gradient is taken.
    return out, (pullback, decays, q, k, g, () if decay_grad else None)


def _attention_takes_state(overlapped: bool, backend) -> bool:
    """Whether the local attention is called with the incoming state (and its backward is the
    state-first one): the state-first form, or the overlapped one on a late_state backend."""
    return not overlapped or backend.late_state


def _overlapped(overlap, axis_name, q, v, backend) -> bool:
    """``overlap``, or where None the choice of :func:`gather_overlap_pays`."""
    if overlap is None:
        return gather_overlap_pays(jax.lax.axis_size(axis_name), q.shape, v.shape[-1],
                                   q.dtype.itemsize, late_state=backend.late_state)
    return overlap


def _lasp2_causal_forward(q, k, v, g, s0, axis_name, scale, chunk_size, backend, gather_splits,
                          overlap, decay_grad=False):
    """Returns ((o, final state), the local pullback, the gathered segment decays)."""
    overlap = _overlapped(overlap, axis_name, q, v, backend)

    def gather_incoming(m):
        """One all-gather of the packed (M_r, Gamma_r), [W, B, H, Dk, Dv + 1]; the scan."""
        packed = jnp.concatenate([m, total_log_decay(g, m.shape[:3])[..., None]], axis=-1)
        gathered = gather_states(packed, axis_name, gather_splits)
        decays, summaries = jnp.exp(gathered[..., -1]), gathered[..., :-1]
        rank = jax.lax.axis_index(axis_name)
        return (*incoming_state(decays, summaries, s0.astype(_f32), rank), decays)

    if _attention_takes_state(overlap, backend):
        # The summary alone first (a forward value: the custom backward below accounts for
        # it), then the attention from the incoming state. A fixed decay is closed over: no
        # decay-gradient work. Where the backend can, the attention takes back the segment
        # summaries behind M_r instead of computing them again. Overlapped, a backend with
        # late_state runs its kernels from a zero state while the gather is in flight and adds
        # the incoming state's term after them; its backward is the state-first one.
        reuse = dict(late_state=True) if overlap else {}
        if backend.segment_summaries is not None:
            summaries, m = backend.segment_summaries(k, v, g, q=q, chunk_size=chunk_size,
                                                     decay_grad=decay_grad)
            reuse["segment_summaries"] = summaries
        else:
            m, _ = backend.state_summary(k, v, g)
        s_in, s_final, decays = gather_incoming(m)

        def attention_from(q_, k_, v_, s_, g_):
            return backend.chunk_attention(q_, k_, v_, g_, scale=scale, chunk_size=chunk_size,
                                           initial_state=s_, **reuse)

        (o, _), attention_pullback = _vjp(attention_from, (q, k, v, s_in), g, decay_grad)
        pullback = jax.tree_util.Partial(_state_last, attention_pullback)
        return (o, s_final), pullback, decays

    # The rank's summary M_r is the final state of its attention from a zero state. The Pallas
    # backend folds it from its segment summaries before its output kernel runs, so the gather
    # waits for the summaries only and overlaps the output kernel; the summary is not computed
    # a second time.
    def attention(q_, k_, v_, g_):
        return backend.chunk_attention(q_, k_, v_, g_, scale=scale, chunk_size=chunk_size)

    (o_zero, m), attention_pullback = _vjp(attention, (q, k, v), g, decay_grad)
    s_in, s_final, decays = gather_incoming(m)
    # The barrier makes every use of s_in (which waits for the other ranks) come after the
    # local attention: the scheduler then places the collective's wait after the kernels and
    # the communication runs under them, instead of finishing first.
    s_in, o_zero, m = jax.lax.optimization_barrier((s_in, o_zero, m))

    def enter(o_, m_, q_, s_, g_):
        return enter_state(o_, m_, q_, g_, s_, scale)

    (o, _), enter_pullback = _vjp(enter, (o_zero, m, q, s_in), g, decay_grad)
    pullback = jax.tree_util.Partial(_local_cotangents, attention_pullback, enter_pullback)
    return (o, s_final), pullback, decays


def _state_last(attention_pullback, cts):
    """(dq, dk, dv, dg, ds_in) from the pullback of the attention from the incoming state."""
    dq, dk, dv, ds_in, dg = attention_pullback(cts)
    return dq, dk, dv, dg, ds_in


def _vjp(fn, args, g, decay_grad: bool):
    """jax.vjp of fn(*args, g); without decay_grad g is closed over and the pullback's last
    cotangent is None."""
    if decay_grad:
        return jax.vjp(fn, *args, g)
    out, pullback = jax.vjp(lambda *a: fn(*a, g), *args)
    return out, jax.tree_util.Partial(_no_decay_cotangent, pullback)


def _no_decay_cotangent(pullback, cts):
    return (*pullback(cts), None)


def _add(a, b):
    return a if b is None else b if a is None else a + b


def _local_cotangents(attention_pullback, enter_pullback, cts):
    """(dq, dk, dv, dg, ds_in) of the rank's local computation, given (do, dS_out)."""
    d_o_zero, d_m, dq_enter, ds_in, dg_enter = enter_pullback(cts)
    dq, dk, dv, dg = attention_pullback((d_o_zero, d_m))
    return dq + dq_enter, dk, dv, _add(dg, dg_enter), ds_in


def _lasp2_causal_bwd(axis_name, scale, chunk_size, backend, want_final, gather_splits, overlap,
                      res, cts):
    pullback, decays, q, k, g, decay_grad = res
    do, d_final = (dense_cotangent(ct) for ct in cts)
    # dS_r: gradient of this rank's outputs with respect to its incoming state.
    if backend.state_gradient is not None and _attention_takes_state(
            _overlapped(overlap, axis_name, q, do, backend), backend):
        # The attention ran from S_r: its backward below computes the same sum, by the same
        # kernel call on the same operands, which XLA then runs once.
        ds = backend.state_gradient(q, do, g, k=k, scale=scale, chunk_size=chunk_size,
                                    decay_grad=decay_grad is not None)
    else:
        ds = scale * state_cotangent(decayed_queries(q, g), do)
    if want_final:
        gathered = gather_states(jnp.stack([ds, d_final.astype(_f32)]), axis_name, gather_splits)
        state_grads, final_grad = gathered[:, 0], jnp.sum(gathered[:, 1], axis=0)
    else:
        state_grads = gather_states(ds, axis_name, gather_splits)
        final_grad = jnp.zeros_like(ds)
    rank = jax.lax.axis_index(axis_name)
    dm = outgoing_cotangent(decays, state_grads, final_grad, rank)
    dq, dk, dv, dg, ds_in = pullback((do, dm))
    return dq, dk, dv, dg, jnp.where(rank == 0, ds_in, 0.0)


lasp2_causal.defvjp(_lasp2_causal_fwd, _lasp2_causal_bwd, symbolic_zeros=True)
# Eager shard_map refuses a custom_vjp with symbolic zeros; called through jit it is fine.
lasp2_causal = jax.jit(lasp2_causal, static_argnums=(5, 6, 7, 8, 9, 10, 11))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def lasp2_bidirectional(q, k, v, s0, axis_name, scale):
    """Bidirectional LASP-2: o = scale * q (S_0 + sum over all ranks of K_r^T V_r).

    Shapes as in :func:`lasp2_causal` (no decay). One all-gather forward, one backward.
    """
    out, _ = _lasp2_bidirectional_fwd(q, k, v, s0, axis_name, scale)
    return out


def _lasp2_bidirectional_fwd(q, k, v, s0, axis_name, scale):
    m = jnp.einsum("blhd,blhe->bhde", k.astype(_f32), v.astype(_f32))
    state = s0.astype(_f32) + jnp.sum(jax.lax.all_gather(m, axis_name), axis=0)
    o = scale * jnp.einsum("blhd,bhde->blhe", q.astype(_f32), state)
    return (o.astype(q.dtype), state), (q, k, v, state)


def _lasp2_bidirectional_bwd(axis_name, scale, res, cts):
    q, k, v, state = res
    do, d_final = cts
    do32 = do.astype(_f32)
    # Each rank adds its share of the final-state cotangent before the one gather.
    ds = scale * jnp.einsum("blhd,blhe->bhde", q.astype(_f32), do32) + d_final
    ds_total = jnp.sum(jax.lax.all_gather(ds, axis_name), axis=0)
    dq = scale * jnp.einsum("blhe,bhde->blhd", do32, state)
    dk = jnp.einsum("blhe,bhde->blhd", v.astype(_f32), ds_total)
    dv = jnp.einsum("blhd,bhde->blhe", k.astype(_f32), ds_total)
    rank = jax.lax.axis_index(axis_name)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
            jnp.where(rank == 0, ds_total, 0.0))


lasp2_bidirectional.defvjp(_lasp2_bidirectional_fwd, _lasp2_bidirectional_bwd)
