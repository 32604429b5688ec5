"""Token mixers: the attention of a Linear-Llama3 block.

Every mixer maps x [B, T, D] (and optional segment ids [B, T]) to [B, T, D] and computes its
attention with :func:`lasp2_jax.linear_attention` or :func:`lasp2_jax.softmax_attention`,
passing the mesh: sequence parallelism (LASP-2 / LASP-2H) happens inside those ops, so the
mixers hold no parallel code.

Packed documents: a linear mixer turns segment ids into a state reset (log decay -inf at each
document's first token), combined with its own decay; softmax attention masks across
documents with the segment ids directly. Bidirectional models ignore segment ids: a reset has
no meaning without an order, so the whole window is one sequence (RoBERTa-style packing).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

import lasp2_jax
from lasp2_jax.models.config import ModelConfig
from lasp2_jax.models.layers import Dense, RMSNorm, constrain, rope

_HEADS = ("batch", "sequence", "heads", "head_dim")
_KV_HEADS = ("batch", "sequence", "kv_heads", "head_dim")


def document_starts(segment_ids):
    """[B, T] int -> [B, T] bool, True at a document's first token (except position 0).

    Position 0 needs no reset: the state entering a sequence is zero anyway.
    """
    prev = jnp.concatenate([segment_ids[:, :1], segment_ids[:, :-1]], axis=1)
    return segment_ids != prev


def with_resets(log_decay, segment_ids, batch: int, length: int, heads: int):
    """Fold document resets into a log decay None | [H] | [B,T,H] | [B,T,H,Dk].

    Returns the input unchanged without segment ids; otherwise a [B,T,H] or [B,T,H,Dk]
    float32 decay that is -inf at document starts (an exact reset inside the op).
    """
    if segment_ids is None:
        return log_decay
    starts = document_starts(segment_ids)  # [B, T]
    if log_decay is None:
        log_decay = jnp.zeros((batch, length, heads), jnp.float32)
    elif log_decay.ndim == 1:
        log_decay = jnp.broadcast_to(log_decay.astype(jnp.float32), (batch, length, heads))
    mask = starts[:, :, None] if log_decay.ndim == 3 else starts[:, :, None, None]
    return jnp.where(mask, -jnp.inf, log_decay.astype(jnp.float32))


def feature_map(x, name: str):
    """Elementwise feature map on q or k: identity, elu+1, relu or silu."""
    if name == "identity":
        return x
    if name == "elu1":
        return nn.elu(x) + 1.0
    if name == "relu":
        return nn.relu(x)
    if name == "silu":
        return nn.silu(x)
    raise ValueError(f"feature_map={name!r}")


def taylor_feature_map(x):
    """Based's 2nd-order Taylor map of exp(q.k): [..., d] -> [..., 1 + d + d(d+1)/2].

    phi(q).phi(k) = 1 + q.k + (q.k)^2 / 2 for x scaled by d^-1/4 (so q.k ~ the usual
    1/sqrt(d) dot product). The quadratic part keeps only i <= j products, with off-diagonal
    terms weighted by sqrt(2) so the symmetric sum is reproduced exactly: d(d+1)/2 columns
    instead of d^2.
    """
    d = x.shape[-1]
    x = x.astype(jnp.float32) * d ** -0.25
    i, j = jnp.triu_indices(d)
    weight = jnp.where(i == j, 1.0, math.sqrt(2.0)) / math.sqrt(2.0)
    quad = x[..., i] * x[..., j] * weight
    return jnp.concatenate([jnp.ones_like(x[..., :1]), x, quad], axis=-1)


def normalized_linear_attention(q, k, v, *, log_decay=None, eps: float = 1e-6, **kw):
    """Linear attention divided by its normaliser q_t . sum_s k_s.

    A ones column appended to v makes the state carry the key sum, so the denominator comes
    out of the same op (and the same sequence-parallel state exchange) as the numerator.
    """
    ones = jnp.ones(v.shape[:-1] + (1,), v.dtype)
    o = lasp2_jax.linear_attention(q, k, jnp.concatenate([v, ones], axis=-1),
                                   log_decay=log_decay, scale=1.0, **kw)
    o = o.astype(jnp.float32)
    return (o[..., :-1] / (o[..., -1:] + eps)).astype(v.dtype)


def lightning_log_decay(heads: int, layer: int, n_layers: int):
    """Lightning Attention's fixed per-head decay [H] for layer ``layer``.

    ALiBi-style slopes 2^(-8(h+1)/H), scaled down with depth by (1 - l/(L-1) + 1e-5): early
    layers forget fast (local), the last layer keeps an almost undecayed state (global).
    """
    slopes = 2.0 ** (-8.0 * (jnp.arange(heads, dtype=jnp.float32) + 1.0) / heads)
    depth = 1.0 - layer / max(n_layers - 1, 1) + 1e-5
    return -slopes * depth


def retention_log_decay(heads: int):
    """RetNet's fixed per-head decay [H]: log(1 - 2^(-5-h))."""
    return jnp.log1p(-(2.0 ** (-5.0 - jnp.arange(heads, dtype=jnp.float32))))


# Names of the mixers' activations that remat="mixer" keeps (models/llama.py).
MIXER_SAVED_NAMES = ("mixer_heads", "mixer_attention", "mixer_out")


class _Mixer(nn.Module):
    """Shared plumbing: projections into heads, the output norm / gate / projection."""

    cfg: ModelConfig
    layer: int = 0
    mesh: object = None

    def dense(self, features, axes, name):
        c = self.cfg
        return Dense(features, axes, dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype),
                     init_std=c.init_std, name=name)

    def heads(self, x, n, d, name, kv=False):
        """x [B, T, D] -> [B, T, n, d] through a projection named ``name``."""
        axes = ("embed", "kv_heads" if kv else "q_heads")
        y = self.dense(n * d, axes, name)(x)
        y = y.reshape(*x.shape[:2], n, d)
        return checkpoint_name(constrain(y, _KV_HEADS if kv else _HEADS, self.mesh),
                               "mixer_heads")

    def output(self, x, o, *, norm: bool):
        """o [B, T, H, Dv] -> [B, T, D]: per-head RMSNorm, optional gate, projection."""
        c = self.cfg
        o = checkpoint_name(o, "mixer_attention")
        if norm:
            o = RMSNorm(c.norm_eps, dtype=jnp.dtype(c.dtype),
                        param_dtype=jnp.dtype(c.param_dtype), name="head_norm")(o)
        B, T, H, Dv = o.shape
        o = o.reshape(B, T, H * Dv)
        if c.output_gate:
            o = o * nn.silu(self.dense(H * Dv, ("embed", "q_heads"), "gate")(x))
        return checkpoint_name(self.dense(x.shape[-1], ("q_heads", "embed"), "out")(o),
                               "mixer_out")

    def resets(self, log_decay, segment_ids, x):
        """The mixer's decay with document resets folded in.

        Bidirectional models see the whole window as one sequence (a state reset has no
        meaning without an order; the window's documents then share context, as in
        RoBERTa's packing).
        """
        if not self.cfg.causal:
            return log_decay
        return with_resets(log_decay, segment_ids, x.shape[0], x.shape[1], self.cfg.n_heads)

    def op_kwargs(self):
        c = self.cfg
        return dict(causal=c.causal, mesh=self.mesh, chunk_size=c.chunk_size, backend=c.backend)


class BasicLinearAttention(_Mixer):
    """o_t = phi(q_t) sum_{s<=t} phi(k_s)^T v_s, optionally normalised; no decay.

    Subclasses override ``log_decay`` to reuse this body with a fixed per-head decay.
    """

    def log_decay(self):
        return None

    @nn.compact
    def __call__(self, x, segment_ids=None):
        c = self.cfg
        H, Hkv, Dh = c.n_heads, c.kv_heads, c.dim_head
        q = feature_map(self.heads(x, H, Dh, "q"), c.feature_map)
        k = feature_map(self.heads(x, Hkv, Dh, "k", kv=True), c.feature_map)
        v = self.heads(x, Hkv, Dh, "v", kv=True)
        g = self.resets(self.log_decay(), segment_ids, x)
        if c.normalize:
            o = normalized_linear_attention(q, k, v, log_decay=g, **self.op_kwargs())
        else:
            o = lasp2_jax.linear_attention(q, k, v, log_decay=g, **self.op_kwargs())
        return self.output(x, o, norm=c.output_norm)


class LightningAttention(BasicLinearAttention):
    """Linear attention with Lightning's fixed per-head, per-layer decay."""

    def log_decay(self):
        return lightning_log_decay(self.cfg.n_heads, self.layer, self.cfg.n_layers)


class Retention(BasicLinearAttention):
    """RetNet retention: linear attention with a fixed per-head decay 1 - 2^(-5-h)."""

    def log_decay(self):
        return retention_log_decay(self.cfg.n_heads)


class GatedLinearAttention(_Mixer):
    """GLA: a data-dependent decay per token, head and key dimension.

    log a_t = logsigmoid(W2 W1 x_t + b) / normalizer, with W1 W2 a low-rank projection; the
    normalizer keeps decays close to 1 at initialisation (long memory).
    """

    @nn.compact
    def __call__(self, x, segment_ids=None):
        c = self.cfg
        H, Hkv, Dh = c.n_heads, c.kv_heads, c.dim_head
        q = self.heads(x, H, Dh, "q")
        k = self.heads(x, Hkv, Dh, "k", kv=True)
        v = self.heads(x, Hkv, Dh, "v", kv=True)
        low = self.dense(c.gate_rank, ("embed", "rank"), "gate_down")(x)
        gate = Dense(H * Dh, ("rank", "q_heads"), dtype=jnp.dtype(c.dtype),
                     param_dtype=jnp.dtype(c.param_dtype), init_std=c.init_std,
                     use_bias=True, name="gate_up")(low)
        g = jax.nn.log_sigmoid(gate.astype(jnp.float32)) / c.gate_normalizer
        g = g.reshape(*x.shape[:2], H, Dh)
        g = self.resets(g, segment_ids, x)
        o = lasp2_jax.linear_attention(q, k, v, log_decay=g, **self.op_kwargs())
        return self.output(x, o, norm=c.output_norm)


class Based(_Mixer):
    """Based: Taylor-feature linear attention on narrow (feature_dim) q/k, normalised."""

    @nn.compact
    def __call__(self, x, segment_ids=None):
        c = self.cfg
        H, Hkv, F = c.n_heads, c.kv_heads, c.feature_dim
        dt = jnp.dtype(c.dtype)
        q = taylor_feature_map(self.heads(x, H, F, "q")).astype(dt)
        k = taylor_feature_map(self.heads(x, Hkv, F, "k", kv=True)).astype(dt)
        v = self.heads(x, Hkv, c.dim_head, "v", kv=True)
        g = self.resets(None, segment_ids, x)
        o = normalized_linear_attention(q, k, v, log_decay=g, **self.op_kwargs())
        return self.output(x, o, norm=c.output_norm)


class QuadraticFeatureMap(nn.Module):
    """Rebased's learnable map phi(x) = (gamma * norm(x) + beta)^2 over the last axis."""

    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        gamma = self.param("gamma", nn.with_logical_partitioning(nn.initializers.ones,
                                                                 ("norm",)), (d,), jnp.float32)
        beta = self.param("beta", nn.with_logical_partitioning(nn.initializers.zeros,
                                                               ("norm",)), (d,), jnp.float32)
        x = x.astype(jnp.float32)
        mu = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.var(x, axis=-1, keepdims=True)
        y = (x - mu) * jax.lax.rsqrt(var + self.eps)
        return jnp.square(gamma * y + beta)


class Rebased(_Mixer):
    """Rebased: normalised linear attention with a learnable quadratic feature map."""

    @nn.compact
    def __call__(self, x, segment_ids=None):
        c = self.cfg
        H, Hkv, F = c.n_heads, c.kv_heads, c.feature_dim
        dt = jnp.dtype(c.dtype)
        q = QuadraticFeatureMap(name="q_map")(self.heads(x, H, F, "q")).astype(dt)
        k = QuadraticFeatureMap(name="k_map")(self.heads(x, Hkv, F, "k", kv=True)).astype(dt)
        v = self.heads(x, Hkv, c.dim_head, "v", kv=True)
        g = self.resets(None, segment_ids, x)
        o = normalized_linear_attention(q, k, v, log_decay=g, **self.op_kwargs())
        return self.output(x, o, norm=c.output_norm)


class SoftmaxAttention(_Mixer):
    """Llama3 attention: GQA with RoPE; documents masked by segment ids."""

    @nn.compact
    def __call__(self, x, segment_ids=None):
        c = self.cfg
        H, Hkv, Dh = c.n_heads, c.kv_heads, c.dim_head
        positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
        q = rope(self.heads(x, H, Dh, "q"), positions, c.rope_theta)
        k = rope(self.heads(x, Hkv, Dh, "k", kv=True), positions, c.rope_theta)
        v = self.heads(x, Hkv, Dh, "v", kv=True)
        # Bidirectional models treat the window as one sequence, as the linear mixers must.
        o = lasp2_jax.softmax_attention(q, k, v, causal=c.causal, mesh=self.mesh,
                                        segment_ids=segment_ids if c.causal else None,
                                        backend=c.softmax_backend)
        return self.output(x, o, norm=False)


MIXER_CLASSES = {
    "basic": BasicLinearAttention,
    "lightning": LightningAttention,
    "retention": Retention,
    "gla": GatedLinearAttention,
    "based": Based,
    "rebased": Rebased,
    "softmax": SoftmaxAttention,
}
