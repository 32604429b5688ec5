"""Llama3 building blocks: Dense and Embed with logical axis names, RMSNorm, SwiGLU, RoPE.

Parameters are created in float32 (``param_dtype``) and cast to the compute dtype at use, so
the optimizer updates full-precision master weights. Every parameter names its logical axes;
:mod:`lasp2_jax.mesh` maps them to mesh axes.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from lasp2_jax.mesh import logical_to_spec


def constrain(x, logical_axes, mesh):
    """Pin an activation's sharding by logical axes (no-op without a mesh)."""
    if mesh is None:
        return x
    spec = logical_to_spec(logical_axes)
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))


class Dense(nn.Module):
    """y = x @ W: [..., d_in] -> [..., features]; W [d_in, features] named ``axes``."""

    features: int
    axes: tuple[str | None, str | None]
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32
    init_std: float = 0.02
    use_bias: bool = False

    @nn.compact
    def __call__(self, x):
        init = nn.with_logical_partitioning(nn.initializers.normal(self.init_std), self.axes)
        w = self.param("kernel", init, (x.shape[-1], self.features), self.param_dtype)
        y = jnp.dot(x.astype(self.dtype), w.astype(self.dtype))
        if self.use_bias:
            binit = nn.with_logical_partitioning(nn.initializers.zeros, (self.axes[1],))
            y = y + self.param("bias", binit, (self.features,), self.param_dtype).astype(y.dtype)
        return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def embedding_lookup(table, tokens, dtype, mesh):
    """table [V, D], tokens [B, T] int -> table[tokens] [B, T, D] in ``dtype``.

    The gradient is the table-sized scatter-add of the output's cotangent. Across ranks that
    hold different tokens (dp, sp), GSPMD would scatter locally and all-reduce the whole
    [V, D] table in f32; when the cotangent is smaller than the table (B*T*D*2 bytes against
    V*D*4: below 2V tokens, 256K at Llama-3's vocabulary) the backward instead all-gathers
    the tokens and the cotangent and every rank scatters all of them itself: no reduction.
    """
    return jnp.take(table, tokens, axis=0).astype(dtype)


def _embedding_fwd(table, tokens, dtype, mesh):
    # [V, 0]: the table's length and dtype for the backward, without holding the table.
    like = jnp.zeros((table.shape[0], 0), table.dtype)
    return embedding_lookup(table, tokens, dtype, mesh), (tokens, like)


def _embedding_bwd(dtype, mesh, res, g):
    tokens, like = res
    (vocab, _), D = like.shape, g.shape[-1]
    if mesh is not None and g.size * g.dtype.itemsize < vocab * D * like.dtype.itemsize:
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        g, tokens = (jax.lax.with_sharding_constraint(x, replicated) for x in (g, tokens))
    grad = jnp.zeros((vocab, D), like.dtype).at[tokens].add(g.astype(like.dtype))
    return grad, None


embedding_lookup.defvjp(_embedding_fwd, _embedding_bwd)


class Embed(nn.Module):
    """Token embedding [vocab, embed]; ``attend`` gives tied output logits."""

    vocab_size: int
    features: int
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32
    init_std: float = 0.02
    mesh: object = None

    def setup(self):
        init = nn.with_logical_partitioning(nn.initializers.normal(self.init_std),
                                            ("vocab", "embed"))
        self.embedding = self.param("embedding", init, (self.vocab_size, self.features),
                                    self.param_dtype)

    def __call__(self, tokens):
        """tokens [B, T] int -> [B, T, D]."""
        return embedding_lookup(self.embedding, tokens, jnp.dtype(self.dtype), self.mesh)

    def attend(self, x):
        """x [..., D] -> logits [..., V] with the embedding as output matrix."""
        return jnp.dot(x.astype(self.dtype), self.embedding.astype(self.dtype).T)


class RMSNorm(nn.Module):
    """x / rms(x) * scale over the last axis; statistics in float32."""

    eps: float = 1e-5
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        init = nn.with_logical_partitioning(nn.initializers.ones, ("norm",))
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale).astype(self.dtype)


class SwiGLU(nn.Module):
    """Llama MLP: W_down(silu(W_gate x) * W_up x); [B, T, D] -> [B, T, D]."""

    hidden: int
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32
    init_std: float = 0.02
    mesh: object = None

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, init_std=self.init_std)
        gate = Dense(self.hidden, ("embed", "mlp"), name="gate", **kw)(x)
        up = Dense(self.hidden, ("embed", "mlp"), name="up", **kw)(x)
        h = constrain(nn.silu(gate) * up, ("batch", "sequence", "act_mlp"), self.mesh)
        return Dense(x.shape[-1], ("mlp", "embed"), name="down", **kw)(h)


class _SwiGLUStep(SwiGLU):
    """SwiGLU as a scan body: (carry, x) -> (carry, mlp(x))."""

    @nn.compact
    def __call__(self, carry, x):
        return carry, SwiGLU.__call__(self, x)


# SwiGLU over a stack of token groups [n, B, T/n, D] in turn, each group recomputed in the
# backward pass: the MLP intermediates exist for one group ([B, T/n, hidden]) at a time. Same
# parameters (and names) as SwiGLU. Call as ChunkedSwiGLU(...)(None, groups) -> (None, out).
ChunkedSwiGLU = nn.scan(nn.remat(_SwiGLUStep, prevent_cse=False), variable_broadcast="params",
                        split_rngs={"params": False}, in_axes=0, out_axes=0)


def token_groups(x, groups: int):
    """x [B, T, ...] as ``groups`` interleaved token groups [groups, B, T/groups, ...].

    Group j holds the tokens t with t % groups == j: with T sharded over 'sp' in contiguous
    blocks each group keeps that sharding, so working group by group moves no data between
    ranks. T % groups == 0.
    """
    B, T = x.shape[:2]
    return jnp.moveaxis(x.reshape(B, T // groups, groups, *x.shape[2:]), 2, 0)


def over_token_groups(x, groups: int, fn):
    """fn on x [B, T, D] as :func:`token_groups` [groups, B, T/g, D], then back to [B, T, D']."""
    B, T, D = x.shape
    if T % groups:
        raise ValueError(f"mlp_chunks={groups} must divide the sequence length {T}")
    ys = fn(token_groups(x, groups))
    return jnp.moveaxis(ys, 0, 2).reshape(B, T, ys.shape[-1])


def rope(x, positions, theta: float):
    """Rotary position embedding (rotate-half form) on x [B, T, H, D] at positions [B, T]."""
    d = x.shape[-1]
    freqs = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)
    angles = positions[..., None].astype(jnp.float32) * freqs  # [B, T, D/2]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
