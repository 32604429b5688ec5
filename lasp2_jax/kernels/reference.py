"""Reference twins: token-by-token recurrence and quadratic masked forms.

These are the oracles of the test suite. They favour obviousness over speed, share no code with
the chunked or parallel paths, and compute in the dtype they are given (float64 under
``jax.enable_x64``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _broadcast_decay(log_decay, shape):
    """Any accepted log_decay form -> [B, T, H, Dk] (zeros when absent)."""
    B, T, H, Dk = shape
    if log_decay is None:
        return jnp.zeros(shape)
    g = jnp.asarray(log_decay)
    if g.ndim == 1:  # [H]
        g = g[None, None, :, None]
    elif g.ndim == 3:  # [B, T, H]
        g = g[..., None]
    return jnp.broadcast_to(g, shape)


def _expand_kv(q, x):
    """GQA: repeat kv heads so that query head h reads kv head h // (H // Hkv)."""
    return jnp.repeat(x, q.shape[2] // x.shape[2], axis=2)


def linear_attention_recurrent(q, k, v, log_decay=None, *, causal=True, scale=None,
                               initial_state=None):
    """The recurrence S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = scale * q_t S_t.

    Args:
      q: [B, T, H, Dk]; k: [B, T, Hkv, Dk]; v: [B, T, Hkv, Dv].
      log_decay: None | [H] | [B, T, H] | [B, T, H, Dk].
      causal: False gives o_t = scale * q_t (S_0 + sum_s k_s^T v_s), no decay.
      initial_state: [B, H, Dk, Dv] or None.
    Returns:
      o [B, T, H, Dv] and the final state [B, H, Dk, Dv], in the inputs' dtype.
    """
    B, T, H, Dk = q.shape
    k, v = _expand_kv(q, k), _expand_kv(q, v)
    Dv = v.shape[-1]
    scale = Dk ** -0.5 if scale is None else scale
    s0 = jnp.zeros((B, H, Dk, Dv), q.dtype) if initial_state is None else initial_state
    if not causal:
        state = s0 + jnp.einsum("bthd,bthe->bhde", k, v)
        return scale * jnp.einsum("bthd,bhde->bthe", q, state), state
    a = jnp.exp(_broadcast_decay(log_decay, q.shape).astype(q.dtype))

    def step(state, xs):
        q_t, k_t, v_t, a_t = xs  # [B, H, Dk], [B, H, Dk], [B, H, Dv], [B, H, Dk]
        state = a_t[..., None] * state + k_t[..., :, None] * v_t[..., None, :]
        return state, scale * jnp.einsum("bhd,bhde->bhe", q_t, state)

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, a))
    final, o = jax.lax.scan(step, s0, xs)
    return jnp.moveaxis(o, 0, 1), final


def linear_attention_quadratic(q, k, v, log_decay=None, *, scale=None, initial_state=None):
    """Causal linear attention in the parallel masked form (O(T^2 Dk) memory; tests only).

    o_i = scale * sum_{j<=i} (q_i * exp(sum_{j<t<=i} g_t)) . k_j  v_j
          + scale * (q_i * exp(sum_{t<=i} g_t)) S_0
    Shapes as in :func:`linear_attention_recurrent`; returns o only.
    """
    B, T, H, Dk = q.shape
    k, v = _expand_kv(q, k), _expand_kv(q, v)
    scale = Dk ** -0.5 if scale is None else scale
    g = _broadcast_decay(log_decay, q.shape).astype(q.dtype)
    # decay[b, i, j, h, d] = sum over t in (j, i] of g_t, built by masked sums (no subtraction).
    t = jnp.arange(T)
    window = (t[None, None, :] > t[None, :, None]) & (t[None, None, :] <= t[:, None, None])
    decay = jnp.einsum("ijt,bthd->bijhd", window.astype(q.dtype), g)
    causal = (t[:, None] >= t[None, :])[None, :, :, None, None]
    weight = jnp.where(causal, jnp.exp(jnp.where(causal, decay, 0.0)), 0.0)
    o = scale * jnp.einsum("bihd,bjhd,bijhd,bjhe->bihe", q, k, weight, v)
    if initial_state is not None:
        prefix = jnp.exp(jnp.cumsum(g, axis=1))
        o = o + scale * jnp.einsum("bihd,bhde->bihe", q * prefix, initial_state)
    return o


def softmax_attention_reference(q, k, v, *, causal=True, scale=None, segment_ids=None):
    """Dense softmax attention. q [B, T, H, D]; k, v [B, T, Hkv, D]; segment_ids [B, T] or None.

    Returns [B, T, H, Dv]. Rows with no visible key (cannot happen when causal) give zeros.
    """
    B, T, H, D = q.shape
    k, v = _expand_kv(q, k), _expand_kv(q, v)
    scale = D ** -0.5 if scale is None else scale
    logits = scale * jnp.einsum("bihd,bjhd->bhij", q, k)
    mask = jnp.ones((T, T), bool)
    if causal:
        mask = jnp.tril(mask)
    mask = mask[None, None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    logits = jnp.where(mask, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhij,bjhe->bihe", probs, v)


def reverse_decay_sums_reference(dbq, dbk, final_term):
    """float64 numpy twin of pallas_scans.reverse_decay_sums: dg_t = sum_{s >= t} (dbq_s -
    dbk_s), with final_term [B, H, Dk] added at the last token. dbq, dbk: [B, T, H, Dk]."""
    diff = np.asarray(dbq, np.float64) - np.asarray(dbk, np.float64)
    diff[:, -1] += np.asarray(final_term, np.float64)
    return np.flip(np.cumsum(np.flip(diff, 1), axis=1), 1)
