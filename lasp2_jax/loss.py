"""The language-model loss: token cross-entropy over a large vocabulary, in token chunks.

At Llama-3's 128K vocabulary the logits of 16K tokens are 8.4 GB in float32, so the loss
works through the sequence in chunks and never holds all of them. Its backward is written
by hand (:func:`_grouped_losses_bwd`) so that each chunk's logits are read once after they
are recomputed: the rounded softmax-minus-one-hot leaves in the same pass. Autodiff of a
checkpointed chunk instead recomputed the maximum and the exponential sum as well, and wrote
the float32 cotangent of the logits before rounding it. In a 1B training step at 64K tokens on
an H100 the non-matmul kernels went from 296 to 245 ms (README, Performance).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lasp2_jax.models.layers import constrain, token_groups

_LOGITS_AXES = ("batch", "sequence", "act_vocab")


def _logits(h, w, mesh):
    """h [B, t, D] and w [D, V], both in the compute dtype -> float32 logits [B, t, V]."""
    logits = jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32)
    return constrain(logits, _LOGITS_AXES, mesh)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def grouped_token_losses(hs, w, targets, mesh=None):
    """Cross-entropy of each token, chunk by chunk.

    hs [n, B, t, D] final hidden states in n token chunks, w [D, V] output matrix, targets
    [n, B, t] int -> float32 losses [n, B, t], logsumexp(h w) - (h w)[target].

    The backward rounds the logits' cotangent to h's dtype, so both of its matmuls (dh, dw)
    take bf16 operands in a bf16 model (on float32 operands they would run as TF32 at best);
    dw is accumulated over the chunks in float32 and returned in w's dtype.
    """
    return _grouped_losses_fwd(hs, w, targets, mesh)[0]


def _grouped_losses_fwd(hs, w, targets, mesh):
    # Cast once, outside the chunk loop: XLA kept a cast written inside it in the loop (about
    # 1 ms a chunk for the 1B model's [2048, 128256] matrix on an H100).
    wc = w.astype(hs.dtype)

    def chunk(_, xs):
        h, tgt = xs
        logits = _logits(h, wc, mesh)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
        return None, (lse - picked, lse)

    _, (losses, lse) = jax.lax.scan(chunk, None, (hs, targets))
    return losses, (hs, w, targets, lse)


def _grouped_losses_bwd(mesh, res, g):
    hs, w, targets, lse = res
    wc = w.astype(hs.dtype)

    def chunk(dw, xs):
        h, tgt, lse_c, g_c = xs
        logits = _logits(h, wc, mesh)
        # One pass over the logits: softmax minus the one-hot target, times the loss's
        # cotangent, rounded to the matmul dtype.
        vocab = jnp.arange(logits.shape[-1], dtype=tgt.dtype)
        onehot = (vocab == tgt[..., None]).astype(jnp.float32)
        dlogits = ((jnp.exp(logits - lse_c[..., None]) - onehot) * g_c[..., None]).astype(h.dtype)
        dlogits = constrain(dlogits, _LOGITS_AXES, mesh)
        dh = jnp.einsum("btv,dv->btd", dlogits, wc, preferred_element_type=jnp.float32)
        dw = dw + jnp.einsum("btd,btv->dv", h, dlogits, preferred_element_type=jnp.float32)
        return dw, dh.astype(h.dtype)

    dw, dhs = jax.lax.scan(chunk, jnp.zeros(w.shape, jnp.float32), (hs, targets, lse, g))
    return dhs, dw.astype(w.dtype), None


grouped_token_losses.defvjp(_grouped_losses_fwd, _grouped_losses_bwd)


def chunked_cross_entropy(h, w, targets, weights, n_chunks: int, mesh=None):
    """Sum of weighted token cross-entropies and of weights, never holding all logits.

    h [B, T, D], w [D, V], targets / weights [B, T]. Tokens are split into ``n_chunks``
    interleaved groups (:func:`lasp2_jax.models.layers.token_groups`), which keep the 'sp'
    sharding; peak memory holds one group's [B, T / n_chunks, V] float32 logits.
    """
    if h.shape[1] % n_chunks:
        raise ValueError(f"ce_chunks={n_chunks} must divide the sequence length {h.shape[1]}")
    losses = grouped_token_losses(token_groups(h, n_chunks), w,
                                  token_groups(targets, n_chunks), mesh)
    return jnp.sum(losses * token_groups(weights, n_chunks)), jnp.sum(weights)
