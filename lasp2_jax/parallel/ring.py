"""Ring Attention baseline for softmax layers, in local view: K and V travel around the ring
with ``ppermute``, one hop per step, while each rank absorbs the block it holds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lasp2_jax.kernels.softmax_xla import absorb_blocks, finish, init_carry


def ring_softmax(q, k, v, segment_ids=None, *, axis_name, causal: bool, scale: float,
                 block_size: int = 512):
    """Shapes as in :func:`lasp2_jax.parallel.lasp2h.lasp2h_softmax`."""
    L = q.shape[1]
    world = jax.lax.axis_size(axis_name) if axis_name is not None else 1
    rank = jax.lax.axis_index(axis_name) if axis_name is not None else 0
    q_pos = rank * L + jnp.arange(L)
    carry = init_carry(q, k.shape[2], v.shape[-1])
    block = (k, v, segment_ids)
    ring = [(i, (i + 1) % world) for i in range(world)]
    for step in range(world):
        source = (rank - step) % world  # the rank whose keys we hold at this step
        kb, vb, seg = block
        carry = absorb_blocks(carry, q, kb, vb, q_pos, source * L + jnp.arange(L), segment_ids,
                              seg, causal=causal, scale=scale, block_size=block_size)
        if step < world - 1:
            block = jax.tree.map(lambda x: jax.lax.ppermute(x, axis_name, ring), block)
    return finish(carry, q.dtype)
