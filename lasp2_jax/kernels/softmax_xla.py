"""Softmax attention over key blocks with an online softmax, in plain jnp.

Shared by LASP-2H (local queries against all-gathered keys) and Ring Attention (keys arrive
one rank at a time). A running (acc, max, sum) carry absorbs one key block at a time, so the
logits never exceed [L, block] per head, and ``jax.checkpoint`` on each block keeps only the
carries for the backward pass.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

_f32 = jnp.float32


class Carry(NamedTuple):
    """Online-softmax accumulators for queries [B, L, H, D] grouped as [B, Hkv, G, L, ...]."""

    acc: jax.Array  # [B, Hkv, G, L, Dv] sum_j p_ij v_j (unnormalised)
    max: jax.Array  # [B, Hkv, G, L]     running max of the logits (-inf: nothing seen)
    sum: jax.Array  # [B, Hkv, G, L]     sum_j p_ij


def init_carry(q, kv_heads: int, value_dim: int) -> Carry:
    B, L, H, _ = q.shape
    shape = (B, kv_heads, H // kv_heads, L)
    return Carry(jnp.zeros(shape + (value_dim,), _f32), jnp.full(shape, -jnp.inf, _f32),
                 jnp.zeros(shape, _f32))


def attend_block(carry: Carry, q, k, v, q_pos, k_pos, q_seg=None, k_seg=None, *,
                 causal: bool, scale: float) -> Carry:
    """Absorb one key block into the carry.

    Args:
      q: [B, L, H, D]; k: [B, S, Hkv, D]; v: [B, S, Hkv, Dv] (H a multiple of Hkv).
      q_pos: [L] and k_pos: [S] global token positions (the causal mask compares them;
        a negative k_pos marks padding).
      q_seg: [B, L], k_seg: [B, S] document ids or None.
    """
    B, L, H, D = q.shape
    hkv = k.shape[2]
    qg = q.reshape(B, L, hkv, H // hkv, D)
    logits = scale * jnp.einsum("blkgd,bskd->bkgls", qg, k, preferred_element_type=_f32)
    mask = (k_pos >= 0)[None, :]
    if causal:
        mask = mask & (k_pos[None, :] <= q_pos[:, None])
    mask = mask[None, None, None]
    if q_seg is not None:
        mask = mask & (q_seg[:, None, None, :, None] == k_seg[:, None, None, None, :])
    logits = jnp.where(mask, logits, -jnp.inf)
    # The shift is a numerical device only: the result does not depend on it.
    new_max = jax.lax.stop_gradient(jnp.maximum(carry.max, jnp.max(logits, axis=-1)))
    safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
    p = jnp.exp(logits - safe_max[..., None])
    rescale = jnp.exp(carry.max - safe_max)
    acc = rescale[..., None] * carry.acc + jnp.einsum("bkgls,bskd->bkgld", p, v.astype(_f32))
    return Carry(acc, new_max, rescale * carry.sum + jnp.sum(p, axis=-1))


def merge_carries(a: Carry, b: Carry) -> Carry:
    """Combine two carries over disjoint key sets."""
    new_max = jnp.maximum(a.max, b.max)
    safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
    ra, rb = jnp.exp(a.max - safe_max), jnp.exp(b.max - safe_max)
    return Carry(ra[..., None] * a.acc + rb[..., None] * b.acc, new_max,
                 ra * a.sum + rb * b.sum)


def finish(carry: Carry, dtype):
    """Normalise: [B, Hkv, G, L, Dv] -> [B, L, H, Dv]; rows that saw no key give zeros."""
    o = carry.acc / jnp.where(carry.sum > 0, carry.sum, 1.0)[..., None]
    B, hkv, G, L, Dv = o.shape
    return jnp.moveaxis(o, 3, 1).reshape(B, L, hkv * G, Dv).astype(dtype)


def absorb_blocks(carry: Carry, q, k, v, q_pos, k_pos, q_seg=None, k_seg=None, *,
                  causal: bool, scale: float, block_size: int = 512) -> Carry:
    """Absorb keys k, v [B, S, Hkv, D] at positions k_pos [S] one block at a time.

    Logits never exceed [L, block_size] per head; ``jax.checkpoint`` on each block keeps only
    the carries for the backward pass; blocks that no query can see are skipped (causal
    attention on a late rank, or the upper half of Ring Attention's steps).
    """
    B, S = k.shape[:2]
    bs = min(block_size, S)
    pad = (-S) % bs
    n = (S + pad) // bs

    def blocks(x, fill=0):
        if x is None:
            return None
        widths = [(0, 0)] * x.ndim
        widths[x.ndim - 1 if x.ndim == 1 else 1] = (0, pad)
        x = jnp.pad(x, widths, constant_values=fill)
        if x.ndim == 1:
            return x.reshape(n, bs)
        return jnp.moveaxis(x.reshape(B, n, bs, *x.shape[2:]), 1, 0)

    last_query = jnp.max(q_pos)

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def step(carry, xs):
        kb, vb, pos, segb = xs
        # A block of padding, or (causal) of keys after every query, changes nothing: skip it.
        first_key = jnp.min(jnp.where(pos >= 0, pos, jnp.iinfo(pos.dtype).max))
        visible = (first_key <= last_query) if causal else jnp.any(pos >= 0)
        carry = jax.lax.cond(
            visible,
            lambda c: attend_block(c, q, kb, vb, q_pos, pos, q_seg, segb, causal=causal,
                                   scale=scale),
            lambda c: c, carry)
        return carry, None

    xs = (blocks(k), blocks(v), blocks(k_pos, fill=-1), blocks(k_seg))
    carry, _ = jax.lax.scan(step, carry, xs)
    return carry


def blockwise_attention(q, k, v, *, q_pos, causal: bool, scale: float, q_seg=None,
                        k_seg=None, block_size: int = 512):
    """Softmax attention of q against all of k, v, one key block at a time.

    Args:
      q: [B, L, H, D]; k, v: [B, S, Hkv, D|Dv]; q_pos: [L] global query positions (keys sit at
        positions 0..S-1); q_seg [B, L], k_seg [B, S] or None.
    Returns:
      [B, L, H, Dv] in q's dtype.
    """
    carry = init_carry(q, k.shape[2], v.shape[-1])
    carry = absorb_blocks(carry, q, k, v, q_pos, jnp.arange(k.shape[1]), q_seg, k_seg,
                          causal=causal, scale=scale, block_size=block_size)
    return finish(carry, q.dtype)
