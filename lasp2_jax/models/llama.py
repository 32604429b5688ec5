"""Linear-Llama3: Llama3 blocks (pre-norm, SwiGLU, GQA) around a token mixer per layer."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lasp2_jax.models.config import ModelConfig
from lasp2_jax.models.layers import (
    ChunkedSwiGLU,
    Dense,
    Embed,
    RMSNorm,
    SwiGLU,
    constrain,
    over_token_groups,
)
from lasp2_jax.models.mixers import MIXER_CLASSES, MIXER_SAVED_NAMES

_ACT = ("batch", "sequence", "act_embed")

_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    # Keep the projections' outputs (cheap to store, costly to redo), recompute the rest.
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Keep what the mixer's backward needs (its q, k, v projections, its attention output and
    # its output projection, named in mixers.py): the backward recomputes only the norms and
    # the MLP's gate and up projections, not the attention. D-wide tensors only, where "dots"
    # also keeps the MLP's [T, mlp_dim] products.
    "mixer": jax.checkpoint_policies.save_only_these_names(*MIXER_SAVED_NAMES),
}


class Block(nn.Module):
    """x + mixer(norm(x)), then + mlp(norm(.)); [B, T, D] -> [B, T, D].

    ``layer`` may be traced (inside the layer scan); ``kind`` then names the mixer statically.
    """

    cfg: ModelConfig
    layer: int = 0
    mesh: object = None
    kind: str | None = None

    @nn.compact
    def __call__(self, x, segment_ids=None):
        c = self.cfg
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        mixer = MIXER_CLASSES[self.kind or c.layer_mixer(self.layer)]
        h = RMSNorm(c.norm_eps, dtype=dt, param_dtype=pdt, name="mixer_norm")(x)
        x = x + mixer(c, self.layer, self.mesh, name="mixer")(h, segment_ids)
        x = constrain(x, _ACT, self.mesh)
        h = RMSNorm(c.norm_eps, dtype=dt, param_dtype=pdt, name="mlp_norm")(x)
        mlp_kw = dict(dtype=dt, param_dtype=pdt, init_std=c.init_std, mesh=self.mesh, name="mlp")
        if c.mlp_chunks > 1:
            mlp = ChunkedSwiGLU(c.mlp_dim, **mlp_kw)
            x = x + over_token_groups(h, c.mlp_chunks, lambda groups: mlp(None, groups)[1])
        else:
            x = x + SwiGLU(c.mlp_dim, **mlp_kw)(h)
        return constrain(x, _ACT, self.mesh)


def _block_class(c: ModelConfig):
    if c.remat == "none":
        return Block
    return nn.remat(Block, policy=_REMAT_POLICIES[c.remat], prevent_cse=True)


class BlockPeriod(nn.Module):
    """One period of the mixer pattern (``cfg.layer_period`` blocks): the body of the layer
    scan. (x [B, T, D], segment_ids, period index p) -> (x, None); block j is layer
    p * period + j, with its mixer fixed by j."""

    cfg: ModelConfig
    mesh: object = None

    @nn.compact
    def __call__(self, x, segment_ids, period_index):
        c, block = self.cfg, _block_class(self.cfg)
        for j in range(c.layer_period):
            x = block(c, period_index * c.layer_period + j, self.mesh, kind=c.layer_mixer(j),
                      name=f"block_{j}")(x, segment_ids)
        return x, None


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
                           init_std=c.init_std, mesh=self.mesh)
        if c.scan_layers:
            # One copy of the block in the program (and of each kernel): compile time does not
            # grow with depth. Parameters are stacked along a leading 'layers' axis.
            self.layers = nn.scan(
                BlockPeriod, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(nn.broadcast, 0), length=c.n_layers // c.layer_period,
                metadata_params={nn.PARTITION_NAME: "layers"})(c, self.mesh)
        else:
            block = _block_class(c)
            self.blocks = [block(c, i, self.mesh, name=f"layer_{i}")
                           for i in range(c.n_layers)]
        self.final_norm = RMSNorm(c.norm_eps, dtype=dt, param_dtype=pdt)
        if not c.tie_embeddings:
            self.lm_head = Dense(c.vocab_size, ("embed", "vocab"), dtype=dt, param_dtype=pdt,
                                 init_std=c.init_std)

    def hidden(self, tokens, segment_ids=None):
        """tokens [B, T] -> final-normed hidden states [B, T, D]."""
        x = constrain(self.embed(tokens), _ACT, self.mesh)
        if self.cfg.scan_layers:
            periods = jnp.arange(self.cfg.n_layers // self.cfg.layer_period)
            x, _ = self.layers(x, segment_ids, periods)
        else:
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
