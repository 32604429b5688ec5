"""LASP-2H for softmax layers, in local view: all-gather K and V (kv heads only) over the
sequence axis and attend the local queries against them with this rank's causal offset.
Autodiff of ``all_gather`` is a reduce-scatter of dK and dV, which is the backward we want.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lasp2_jax.kernels.softmax_xla import blockwise_attention


def lasp2h_softmax(q, k, v, segment_ids=None, *, axis_name, causal: bool, scale: float,
                   block_size: int = 512, backend: str = "xla"):
    """q: [B, L, H, D]; k, v: [B, L, Hkv, D]; segment_ids: [B, L] or None -> [B, L, H, Dv].

    backend: "xla" (blockwise jnp) or "pallas" (flash-attention kernels with the rank's offset).
    """
    L = q.shape[1]
    q_seg = k_seg = segment_ids
    offset = 0
    if axis_name is not None:
        k, v = (jax.lax.all_gather(x, axis_name, axis=1, tiled=True) for x in (k, v))
        if segment_ids is not None:
            k_seg = jax.lax.all_gather(segment_ids, axis_name, axis=1, tiled=True)
        offset = jax.lax.axis_index(axis_name) * L
    if backend == "pallas":
        from lasp2_jax.kernels.softmax_pallas import flash_attention

        return flash_attention(q, k, v, q_offset=offset, causal=causal, scale=scale,
                               q_seg=q_seg, k_seg=k_seg)
    return blockwise_attention(q, k, v, q_pos=offset + jnp.arange(L), causal=causal,
                               scale=scale, q_seg=q_seg, k_seg=k_seg, block_size=block_size)
