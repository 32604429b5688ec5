"""Log-decay forms and the cumulative sums built from them.

Every decay form of the public API is reduced to one of three canonical forms before any
compute: ``None`` (no decay), a per-token scalar ``[B, T, H]`` or a per-token vector
``[B, T, H, Dk]``, always float32. Sums of log decays are built only by adding non-positive
numbers, never by subtracting two prefix sums: a state reset (``-inf``, or ``-1e30``) then
gives exact zeros instead of ``inf - inf = nan``, and long prefixes lose no precision.
"""

from __future__ import annotations

import jax.numpy as jnp


def canonical_log_decay(log_decay, batch: int, length: int, heads: int, key_dim: int):
    """Validate a log_decay form and bring it to None | [B, T, H] | [B, T, H, Dk] float32.

    Raises ValueError naming the expected and received shapes.
    """
    if log_decay is None:
        return None
    g = jnp.asarray(log_decay)
    allowed = {1: (heads,), 3: (batch, length, heads), 4: (batch, length, heads, key_dim)}
    if g.ndim not in allowed or g.shape != allowed[g.ndim]:
        raise ValueError(
            f"log_decay has shape {tuple(g.shape)}; expected [H]={allowed[1]}, "
            f"[B,T,H]={allowed[3]} or [B,T,H,Dk]={allowed[4]}")
    g = g.astype(jnp.float32)
    if g.ndim == 1:
        g = jnp.broadcast_to(g, (batch, length, heads))
    return g


def is_per_dim(g) -> bool:
    """True for the per-key-dimension form [B, T, H, Dk]."""
    return g is not None and g.ndim == 4


def inclusive_cumsum(g, axis: int):
    """b_i = sum_{t <= i} g_t along ``axis``."""
    return jnp.cumsum(g, axis=axis)


def reverse_exclusive_cumsum(g, axis: int):
    """r_i = sum_{t > i} g_t along ``axis`` (decay from token i to the end of the span).

    Built by shifting the reverse inclusive sum, not by subtracting g: keeps -inf exact.
    """
    rev = jnp.flip(jnp.cumsum(jnp.flip(g, axis), axis=axis), axis)
    rev = jnp.moveaxis(rev, axis, -1)
    shifted = jnp.concatenate([rev[..., 1:], jnp.zeros_like(rev[..., :1])], axis=-1)
    return jnp.moveaxis(shifted, -1, axis)


def segment_sums(g):
    """Pairwise decays inside a span: seg[..., i, j] = sum_{j < t <= i} g_t, -inf for j > i.

    Args:
      g: [..., C] log decays.
    Returns:
      [..., C, C] float32; exp() of it is the causal decay mask.
    """
    C = g.shape[-1]
    idx = jnp.arange(C)
    after_j = idx[None, :] > idx[:, None]  # [j, t]: t > j
    x = jnp.where(after_j, g[..., None, :], 0.0)  # [..., j, t]
    sums = jnp.swapaxes(jnp.cumsum(x, axis=-1), -1, -2)  # [..., i, j] = sum_{j<t<=i} g_t
    causal = idx[:, None] >= idx[None, :]
    return jnp.where(causal, sums, -jnp.inf)
