"""LASP-1 baseline, in local view: the state travels rank to rank along a ring of
``ppermute``, so rank r waits for r - 1 (W - 1 sequential hops). Gradients by autodiff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lasp2_jax.kernels.backends import Backend


def lasp1_causal(q, k, v, g, s0, *, axis_name, scale: float, chunk_size: int,
                 backend: Backend):
    """Shapes and results as :func:`lasp2_jax.parallel.lasp2.lasp2_causal`."""
    world = jax.lax.axis_size(axis_name)
    rank = jax.lax.axis_index(axis_name)
    m, log_a = backend.state_summary(k, v, g)
    decay = jnp.exp(log_a)[..., None]
    s0 = s0.astype(jnp.float32)
    s_in = jnp.where(rank == 0, s0, 0.0)
    forward = [(i, i + 1) for i in range(world - 1)]
    for _ in range(world - 1):  # after hop h, ranks 0..h+1 hold their true incoming state
        received = jax.lax.ppermute(decay * s_in + m, axis_name, forward)
        s_in = jnp.where(rank == 0, s0, received)
    # The local attention starts from the state the ring delivered (it waits for it anyway).
    o, s_out = backend.chunk_attention(q, k, v, g, scale=scale, chunk_size=chunk_size,
                                       initial_state=s_in)
    final = jax.lax.psum(jnp.where(rank == world - 1, s_out, 0.0), axis_name)
    return o, final
