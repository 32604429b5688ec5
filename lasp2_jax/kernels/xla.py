"""Chunked linear attention in plain jnp: the portable per-device backend.

The segment of T tokens is cut into N chunks of C tokens. Inside a chunk the causal
attention is a masked [C, C] product (decays from :func:`lasp2_jax.decay.segment_sums`);
between chunks each chunk's state summary is combined by an associative scan, the same
``(A1, M1) o (A2, M2) = (A1 A2, A2 M1 + M2)`` that LASP-2 applies across ranks. Gradients
come from autodiff of this code. Everything is computed in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lasp2_jax.decay import (
    inclusive_cumsum,
    is_per_dim,
    reverse_exclusive_cumsum,
    segment_sums,
)

# The per-dimension decay form materialises [C, C, Dk] pairwise decays per chunk; a short
# chunk keeps that tensor the size of a few copies of q.
PER_DIM_CHUNK = 16

_f32 = jnp.float32


def _combine(earlier, later):
    """Compose two state transitions: first ``earlier``, then ``later``."""
    a1, m1 = earlier
    a2, m2 = later
    return a1 * a2, a2 * m1 + m2


def _pad_time(x, pad: int):
    if x is None or pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    return jnp.pad(x, widths)


def _to_chunks(x, n: int, c: int):
    """[B, T, H, ...] -> [B, H, N, C, ...]."""
    B, _, H = x.shape[:3]
    x = x.reshape(B, n, c, H, *x.shape[3:])
    return jnp.moveaxis(x, 3, 1)


def _from_chunks(x):
    """[B, H, N, C, ...] -> [B, T, H, ...]."""
    B, H, n, c = x.shape[:4]
    x = jnp.moveaxis(x, 1, 3)
    return x.reshape(B, n * c, H, *x.shape[4:])


def state_summary(k, v, log_decay=None):
    """The LASP-2 summary of a segment: its final state from zero, and its total log decay.

    Args:
      k: [B, T, H, Dk]; v: [B, T, H, Dv]; log_decay: None | [B, T, H] | [B, T, H, Dk] (f32).
    Returns:
      M [B, H, Dk, Dv] = sum_i (exp(sum_{t>i} g_t) * k_i)^T v_i, float32, and the total log
      decay [B, H, Dk] (zeros without decay; a scalar decay is broadcast over Dk).
    """
    B, T, H, Dk = k.shape
    k32 = k.astype(_f32)
    if log_decay is None:
        total = jnp.zeros((B, H, Dk), _f32)
    else:
        tail = reverse_exclusive_cumsum(log_decay, axis=1)
        weight = jnp.exp(tail) if is_per_dim(log_decay) else jnp.exp(tail)[..., None]
        k32 = k32 * weight
        total = jnp.sum(log_decay, axis=1)
        total = total if is_per_dim(log_decay) else jnp.broadcast_to(total[..., None], (B, H, Dk))
    m = jnp.einsum("bthd,bthe->bhde", k32, v.astype(_f32))
    return m, total


def chunk_linear_attention(q, k, v, log_decay=None, *, scale: float, chunk_size: int = 64,
                           initial_state=None):
    """Causal linear attention over one device's segment, chunk by chunk.

    Args:
      q, k: [B, T, H, Dk] (kv heads already expanded to H); v: [B, T, H, Dv].
      log_decay: None | [B, T, H] | [B, T, H, Dk], float32, <= 0 (``-inf`` resets).
      scale: multiplies q.
      chunk_size: C; T need not be a multiple (padded here).
      initial_state: [B, H, Dk, Dv] float32 or None (zeros).
    Returns:
      o [B, T, H, Dv] in q's dtype, and the final state [B, H, Dk, Dv] float32.
    """
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    per_dim = is_per_dim(log_decay)
    c = max(1, min(chunk_size, PER_DIM_CHUNK if per_dim else chunk_size, T))
    pad = (-T) % c
    n = (T + pad) // c
    # Padding sits after the real tokens with k = v = 0 and g = 0: it adds nothing to the state.
    qc, kc, vc = (_to_chunks(_pad_time(x.astype(_f32), pad), n, c) for x in (q, k, v))

    if log_decay is None:
        prefix = jnp.ones(qc.shape[:4] + (1,), _f32)  # exp(b_i), [B, H, N, C, 1]
        tail = prefix
        chunk_decay = jnp.ones((B, H, n, 1, 1), _f32)
        mask = jnp.tril(jnp.ones((c, c), _f32))
        scores = jnp.einsum("bhnid,bhnjd->bhnij", qc, kc) * mask
    else:
        g = _to_chunks(_pad_time(log_decay, pad), n, c)  # [B, H, N, C(, Dk)]
        b = inclusive_cumsum(g, axis=3)
        r = reverse_exclusive_cumsum(g, axis=3)
        if per_dim:
            prefix, tail = jnp.exp(b), jnp.exp(r)  # [B, H, N, C, Dk]
            chunk_decay = jnp.exp(b[:, :, :, -1])[..., None]  # [B, H, N, Dk, 1]
            pair = jnp.exp(jnp.moveaxis(segment_sums(jnp.moveaxis(g, -1, -2)), -3, -1))
            scores = jnp.einsum("bhnid,bhnjd,bhnijd->bhnij", qc, kc, pair)
        else:
            prefix, tail = jnp.exp(b)[..., None], jnp.exp(r)[..., None]
            chunk_decay = jnp.exp(b[:, :, :, -1])[..., None, None]
            scores = jnp.einsum("bhnid,bhnjd->bhnij", qc, kc) * jnp.exp(segment_sums(g))
    o_intra = jnp.einsum("bhnij,bhnje->bhnie", scores, vc)

    # States entering each chunk: an inclusive scan over [initial state, chunk 0, ..., N-1].
    chunk_states = jnp.einsum("bhncd,bhnce->bhnde", kc * tail, vc)
    s0 = jnp.zeros((B, H, Dk, Dv), _f32) if initial_state is None else initial_state.astype(_f32)
    decays = jnp.concatenate([jnp.ones_like(chunk_decay[:, :, :1]), chunk_decay], axis=2)
    sums = jnp.concatenate([s0[:, :, None], chunk_states], axis=2)
    _, states = jax.lax.associative_scan(_combine, (decays, sums), axis=2)
    o_inter = jnp.einsum("bhncd,bhnde->bhnce", qc * prefix, states[:, :, :n])

    o = _from_chunks(scale * (o_intra + o_inter))[:, :T]
    return o.astype(q.dtype), states[:, :, n]


def full_linear_attention(q, k, v, *, scale: float, initial_state=None):
    """Bidirectional linear attention: o_t = scale * q_t (S_0 + sum_s k_s^T v_s).

    Shapes as in :func:`chunk_linear_attention`; returns o and the total state.
    """
    state = jnp.einsum("bthd,bthe->bhde", k.astype(_f32), v.astype(_f32))
    if initial_state is not None:
        state = state + initial_state.astype(_f32)
    o = scale * jnp.einsum("bthd,bhde->bthe", q.astype(_f32), state)
    return o.astype(q.dtype), state
