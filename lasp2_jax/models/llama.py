"""Linear-Llama3: Llama3 blocks (pre-norm, SwiGLU, GQA) around a token mixer per layer."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lasp2_jax.models.config import ModelConfig
from lasp2_jax.models.layers import Dense, Embed, RMSNorm, SwiGLU, constrain
from lasp2_jax.models.mixers import MIXER_CLASSES

_ACT = ("batch", "sequence", "act_embed")

_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    # Keep the projections' outputs (cheap to store, costly to redo), recompute the rest.
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nn.Module):
    """x + mixer(norm(x)), then + mlp(norm(.)); [B, T, D] -> [B, T, D]."""

    cfg: ModelConfig
    layer: int = 0
    mesh: object = None

    @nn.compact
    def __call__(self, x, segment_ids=None):
        c = self.cfg
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        mixer = MIXER_CLASSES[c.layer_mixer(self.layer)]
        h = RMSNorm(c.norm_eps, dtype=dt, param_dtype=pdt, name="mixer_norm")(x)
        x = x + mixer(c, self.layer, self.mesh, name="mixer")(h, segment_ids)
        x = constrain(x, _ACT, self.mesh)
        h = RMSNorm(c.norm_eps, dtype=dt, param_dtype=pdt, name="mlp_norm")(x)
        x = x + SwiGLU(c.mlp_dim, dtype=dt, param_dtype=pdt, init_std=c.init_std,
                       mesh=self.mesh, name="mlp")(h)
        return constrain(x, _ACT, self.mesh)


class LinearLlama3(nn.Module):
    """The language model. ``__call__`` gives logits; ``hidden`` the final-normed states.

    tokens [B, T] int, segment_ids [B, T] int or None -> logits [B, T, V] (compute dtype).
    With a mesh, activations are pinned to (batch->dp, sequence->sp) and the mixers' ops run
    sequence parallel over 'sp' and head parallel over 'tp'.
    """

    cfg: ModelConfig
    mesh: object = None

    def setup(self):
        c = self.cfg
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        self.embed = Embed(c.vocab_size, c.d_model, dtype=dt, param_dtype=pdt,
                           init_std=c.init_std)
        block = Block if c.remat == "none" else nn.remat(
            Block, policy=_REMAT_POLICIES[c.remat], prevent_cse=True)
        self.blocks = [block(c, i, self.mesh, name=f"layer_{i}") for i in range(c.n_layers)]
        self.final_norm = RMSNorm(c.norm_eps, dtype=dt, param_dtype=pdt)
        if not c.tie_embeddings:
            self.lm_head = Dense(c.vocab_size, ("embed", "vocab"), dtype=dt, param_dtype=pdt,
                                 init_std=c.init_std)

    def hidden(self, tokens, segment_ids=None):
        """tokens [B, T] -> final-normed hidden states [B, T, D]."""
        x = constrain(self.embed(tokens), _ACT, self.mesh)
        for block in self.blocks:
            x = block(x, segment_ids)
        return self.final_norm(x)

    def logits(self, h):
        """h [..., D] -> logits [..., V]."""
        return self.embed.attend(h) if self.cfg.tie_embeddings else self.lm_head(h)

    def __call__(self, tokens, segment_ids=None):
        return self.logits(self.hidden(tokens, segment_ids))


def output_matrix(params, cfg: ModelConfig):
    """The [D, V] output projection inside ``params`` (the embedding's transpose if tied)."""
    if cfg.tie_embeddings:
        return params["embed"]["embedding"].T
    return params["lm_head"]["kernel"]


def param_count(params) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
