"""Cross-rank scans over the W gathered summaries of LASP-2 (sizes independent of T).

Rank s moves a state through ``S_{s+1} = diag(A_s) S_s + M_s``. After the all-gather every
rank holds all (A_s, M_s) and evaluates its own prefix locally. W is small (the sp size), so
an unrolled loop over ranks with a select costs W elementwise passes over one state and no
memory beyond a few states.
"""

from __future__ import annotations

import jax.numpy as jnp


def incoming_state(decays, summaries, initial_state, rank):
    """States entering ``rank`` and leaving the last rank.

    Args:
      decays: [W, B, H, Dk] per-rank total decay A_s = exp(Gamma_s) (scales the Dk rows).
      summaries: [W, B, H, Dk, Dv] per-rank M_s.
      initial_state: [B, H, Dk, Dv], the state entering rank 0.
      rank: this rank's index along the sequence axis (traced).
    Returns:
      S_rank = sum_{s<rank} (prod_{s<u<rank} A_u) M_s + (prod_{u<rank} A_u) S_0, and S_W.
    """
    state = initial_state
    incoming = initial_state
    for s in range(summaries.shape[0]):
        incoming = jnp.where(rank == s, state, incoming)
        state = decays[s][..., None] * state + summaries[s]
    return incoming, state


def outgoing_cotangent(decays, state_grads, final_grad, rank):
    """Cotangent of the state leaving ``rank``, by the reverse scan of the backward pass.

    Args:
      decays: [W, B, H, Dk] the A_s saved from the forward.
      state_grads: [W, B, H, Dk, Dv] gathered dS_s, the gradient of each rank's outputs with
        respect to its incoming state.
      final_grad: [B, H, Dk, Dv] cotangent of S_W (zeros when the final state is unused).
      rank: this rank's index (traced).
    Returns:
      dM_rank = sum_{s>rank} (prod_{rank<u<s} A_u) dS_s + (prod_{u>rank} A_u) dS_W.
    """
    cot = final_grad  # cotangent of S_{s+1} at the top of each iteration
    out = final_grad
    for s in reversed(range(state_grads.shape[0])):
        out = jnp.where(rank == s, cot, out)
        cot = state_grads[s] + decays[s][..., None] * cot
    return out
