"""LASP-2 for linear attention, in local view (call inside ``shard_map`` over ``axis_name``).

Forward on rank r (DESIGN.md §1): summarise the segment into (M_r, Gamma_r), all-gather the
packed summaries once, and meanwhile run the local chunked attention from a zero state; then
the exclusive scan over ranks gives the incoming state S_r and one [L, Dk] x [Dk, Dv] product
per head adds its contribution. Backward (custom VJP): all-gather dS_r once, reverse-scan it
into dM_r, and pull both cotangents through the local computation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lasp2_jax.compat import dense_cotangent, unwrap_primals
from lasp2_jax.decay import inclusive_cumsum, is_per_dim
from lasp2_jax.kernels.backends import Backend
from lasp2_jax.parallel.scan import incoming_state, outgoing_cotangent

_f32 = jnp.float32


def decayed_queries(q, g):
    """exp(b_i) * q_i with b_i = sum_{t<=i} g_t over the segment: [B, L, H, Dk] float32."""
    q32 = q.astype(_f32)
    if g is None:
        return q32
    b = inclusive_cumsum(g, axis=1)
    return q32 * (jnp.exp(b) if is_per_dim(g) else jnp.exp(b)[..., None])


def total_decay(g, shape):
    """A = exp(sum of g over the segment) as [B, H, Dk] (ones without decay)."""
    if g is None:
        return jnp.ones(shape, _f32)
    total = jnp.exp(jnp.sum(g, axis=1))
    return total if is_per_dim(g) else jnp.broadcast_to(total[..., None], shape)


def local_segment(backend: Backend, scale: float, chunk_size: int, q, k, v, g, s_in):
    """One rank's outputs given the state entering it.

    The chunk backend runs from a zero state (it needs nothing from the other ranks); the
    incoming state enters through ``o += scale * (exp(b) q) S_in`` and
    ``S_out = diag(A) S_in + M``.

    Args:
      q, k: [B, L, H, Dk]; v: [B, L, H, Dv]; g: None | [B, L, H] | [B, L, H, Dk];
      s_in: [B, H, Dk, Dv] float32.
    Returns:
      o [B, L, H, Dv] (q's dtype) and S_out [B, H, Dk, Dv] float32.
    """
    o_zero, m = backend.chunk_attention(q, k, v, g, scale=scale, chunk_size=chunk_size)
    # The barrier makes every use of s_in (which waits for the other ranks) come after the
    # local attention: the scheduler then places the collective's wait after the kernels and
    # the communication runs under them, instead of finishing first.
    s_in, o_zero, m = jax.lax.optimization_barrier((s_in, o_zero, m))
    o = o_zero.astype(_f32) + scale * jnp.einsum("blhd,bhde->blhe", decayed_queries(q, g), s_in)
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10))
def lasp2_causal(q, k, v, g, s0, axis_name, scale, chunk_size, backend, want_final,
                 gather_splits=1):
    """Causal LASP-2 on one rank. Returns (o [B, L, H, Dv], final state [B, H, Dk, Dv]).

    The final state is the same on every rank; its cotangent is summed over ranks, which
    matches how ``shard_map`` transposes a replicated output. The initial state's cotangent
    is returned on rank 0 only, so summing over ranks gives the total.
    """
    out, _, _ = _lasp2_causal_forward(q, k, v, g, s0, axis_name, scale, chunk_size, backend,
                                      gather_splits)
    return out


def _lasp2_causal_fwd(q, k, v, g, s0, axis_name, scale, chunk_size, backend, want_final,
                      gather_splits):
    # symbolic_zeros: the arrays arrive as CustomVJPPrimal. A decay that is not differentiated
    # (Lightning's and RetNet's fixed decays) is closed over below, so the backends skip the
    # decay-gradient work.
    (q, k, v, g, s0), perturbed = unwrap_primals(q, k, v, g, s0)
    decay_grad = perturbed[3]
    out, pullback, decays = _lasp2_causal_forward(q, k, v, g, s0, axis_name, scale, chunk_size,
                                                  backend, gather_splits, decay_grad)
    return out, (pullback, decays, q, g)


def _lasp2_causal_forward(q, k, v, g, s0, axis_name, scale, chunk_size, backend, gather_splits,
                          decay_grad=False):
    """Returns ((o, final state), the local pullback, the gathered segment decays)."""
    m, log_a = backend.state_summary(k, v, g)
    # One all-gather of the packed (M_r, Gamma_r): [W, B, H, Dk, Dv + 1].
    packed = jnp.concatenate([m, log_a[..., None]], axis=-1)
    gathered = gather_states(packed, axis_name, gather_splits)
    decays, summaries = jnp.exp(gathered[..., -1]), gathered[..., :-1]
    rank = jax.lax.axis_index(axis_name)
    s_in, s_final = incoming_state(decays, summaries, s0.astype(_f32), rank)
    # The local attention inside does not read the gathered data, so XLA can overlap the two.
    local = functools.partial(local_segment, backend, scale, chunk_size)
    if decay_grad:
        (o, _), pullback = jax.vjp(local, q, k, v, g, s_in)
    else:
        (o, _), pullback_qkvs = jax.vjp(lambda q_, k_, v_, s_: local(q_, k_, v_, g, s_),
                                        q, k, v, s_in)
        pullback = jax.tree_util.Partial(_no_decay_cotangent, pullback_qkvs)
    return (o, s_final), pullback, decays


def _no_decay_cotangent(pullback_qkvs, cts):
    """The pullback of a fixed decay: (dq, dk, dv, None, ds_in)."""
    dq, dk, dv, ds = pullback_qkvs(cts)
    return dq, dk, dv, None, ds


def _lasp2_causal_bwd(axis_name, scale, chunk_size, backend, want_final, gather_splits, res,
                      cts):
    pullback, decays, q, g = res
    do, d_final = (dense_cotangent(ct) for ct in cts)
    # dS_r: gradient of this rank's outputs with respect to its incoming state.
    ds = scale * jnp.einsum("blhd,blhe->bhde", decayed_queries(q, g), do.astype(_f32))
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
lasp2_causal = jax.jit(lasp2_causal, static_argnums=(5, 6, 7, 8, 9, 10))


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
