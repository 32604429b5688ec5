"""Public entry points: linear and softmax attention, sequence-parallel over a mesh.

Global view (``mesh=...``): inputs of any sharding; B goes to 'dp', T to 'sp', heads to 'tp',
and one ``shard_map`` region runs the local view. Local view (``*_local``): for use inside
the caller's own ``shard_map`` over ``axis_name`` (``None``: one device, no communication).
Both are differentiable and jit-able; every error is a ValueError that names the sizes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from lasp2_jax.decay import canonical_log_decay
from lasp2_jax.kernels.backends import get_backend, resolve_backend_name
from lasp2_jax.parallel.lasp1 import lasp1_causal
from lasp2_jax.parallel.lasp2 import lasp2_bidirectional, lasp2_causal
from lasp2_jax.parallel.lasp2h import lasp2h_softmax
from lasp2_jax.parallel.ring import ring_softmax

_QKV = P("dp", "sp", "tp", None)
_STATE = P("dp", "tp", None, None)


# ----------------------------------------------------------------------------- validation

def _check_qkv(q, k, v):
    """Shapes [B, T, H, Dk], [B, T, Hkv, Dk], [B, T, Hkv, Dv] with Hkv dividing H."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be [B, T, H, D]; got shape {tuple(x.shape)}")
    if k.shape[:2] != q.shape[:2] or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"q, k, v disagree on [B, T]: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"q and k head dims differ: Dk={q.shape[3]} vs {k.shape[3]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k has {k.shape[2]} heads but v has {v.shape[2]}")
    heads, kv_heads = q.shape[2], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"kv heads Hkv={kv_heads} do not divide query heads H={heads}")


def _check_mesh(mesh: Mesh, q, k):
    sizes = dict(mesh.shape)
    missing = {"dp", "sp", "tp"} - set(sizes)
    if missing:
        raise ValueError(f"mesh needs axes ('dp', 'sp', 'tp'); missing {sorted(missing)} "
                         f"(use lasp2_jax.make_mesh)")
    B, T, H, _ = q.shape
    for what, size, axis in (("batch B", B, "dp"), ("sequence length T", T, "sp"),
                             ("query heads H", H, "tp"), ("kv heads Hkv", k.shape[2], "tp")):
        if size % sizes[axis]:
            raise ValueError(f"{what}={size} is not divisible by {axis}={sizes[axis]}")


def _check_state(initial_state, batch, heads, dk, dv):
    if initial_state is not None and tuple(initial_state.shape) != (batch, heads, dk, dv):
        raise ValueError(f"initial_state has shape {tuple(initial_state.shape)}; expected "
                         f"[B, H, Dk, Dv] = {(batch, heads, dk, dv)}")


def _check_decay_is_causal(log_decay, causal):
    if not causal and log_decay is not None:
        raise ValueError("log_decay requires causal=True: a bidirectional state has no order "
                         f"to decay along (got log_decay of shape {tuple(jnp.shape(log_decay))})")


def _check_chunk(chunk_size):
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer")


# ----------------------------------------------------------------------------- linear

def _linear_local(method, q, k, v, log_decay, *, causal, scale, axis_name, chunk_size, backend,
                  initial_state, return_final_state):
    _check_qkv(q, k, v)
    _check_chunk(chunk_size)
    B, T, H, Dk = q.shape
    Dv = v.shape[3]
    _check_decay_is_causal(log_decay, causal)
    g = canonical_log_decay(log_decay, B, T, H, Dk)
    _check_state(initial_state, B, H, Dk, Dv)
    scale = Dk ** -0.5 if scale is None else float(scale)
    be = get_backend(backend)
    # GQA: decay is per query head, so each query head carries its own state.
    k, v = (jnp.repeat(x, H // x.shape[2], axis=2) for x in (k, v))
    # States are float32 whatever the inputs (the custom VJPs return float32 cotangents).
    s0 = (jnp.zeros((B, H, Dk, Dv), jnp.float32) if initial_state is None
          else initial_state.astype(jnp.float32))

    if axis_name is None:
        if causal:
            o, s = be.chunk_attention(q, k, v, g, scale=scale, chunk_size=chunk_size,
                                      initial_state=s0)
        else:
            o, s = be.full_attention(q, k, v, scale=scale, initial_state=s0)
    elif not causal:
        o, s = lasp2_bidirectional(q, k, v, s0, axis_name, scale)
    elif method == "lasp2":
        o, s = lasp2_causal(q, k, v, g, s0, axis_name, scale, chunk_size, be, return_final_state)
    else:
        o, s = lasp1_causal(q, k, v, g, s0, axis_name=axis_name, scale=scale,
                            chunk_size=chunk_size, backend=be)
    return (o, s) if return_final_state else o


def _linear_global(method, q, k, v, *, log_decay, causal, scale, mesh, chunk_size, backend,
                   initial_state, return_final_state):
    local = functools.partial(
        _linear_local, method, causal=causal, scale=scale, chunk_size=chunk_size,
        backend=backend, return_final_state=return_final_state)
    if mesh is None:
        return local(q, k, v, log_decay, axis_name=None, initial_state=initial_state)
    _check_qkv(q, k, v)
    _check_mesh(mesh, q, k)
    B, T, H, Dk = q.shape
    _check_decay_is_causal(log_decay, causal)
    # [H] is broadcast to [B, T, H] here so that every decay form shards like q.
    g = canonical_log_decay(log_decay, B, T, H, Dk)
    _check_state(initial_state, B, H, Dk, v.shape[3])

    def region(q, k, v, g, s0):
        return local(q, k, v, g, axis_name="sp", initial_state=s0)

    g_spec = None if g is None else P("dp", "sp", "tp", *([None] * (g.ndim - 3)))
    s_spec = None if initial_state is None else _STATE
    out_specs = (_QKV, _STATE) if return_final_state else _QKV
    # check_vma=False: a replicated output's cotangent reaches each rank divided by the axis
    # size and a replicated input's cotangent is summed over it; lasp2_causal relies on that.
    return jax.shard_map(region, mesh=mesh, in_specs=(_QKV, _QKV, _QKV, g_spec, s_spec),
                         out_specs=out_specs, check_vma=False)(q, k, v, g, initial_state)


def linear_attention(q, k, v, *, log_decay=None, causal: bool = True, scale: float | None = None,
                     mesh: Mesh | None = None, chunk_size: int = 64, backend: str = "auto",
                     initial_state=None, return_final_state: bool = False):
    """Linear attention with LASP-2 sequence parallelism over ``mesh``'s 'sp' axis.

    Computes S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t and o_t = scale * q_t S_t (causal), or
    o_t = scale * q_t (S_0 + sum_s k_s^T v_s) (``causal=False``).

    Args:
      q: [B, T, H, Dk]; k: [B, T, Hkv, Dk]; v: [B, T, Hkv, Dv]; Hkv divides H (GQA).
      log_decay: None | [H] | [B, T, H] | [B, T, H, Dk], per query head, <= 0; ``-inf`` (or
        -1e30) resets the state exactly. Only with ``causal=True``.
      scale: multiplies q; default Dk ** -0.5.
      mesh: a ('dp', 'sp', 'tp') mesh from :func:`lasp2_jax.make_mesh`; None runs on one
        device with no communication.
      chunk_size: tokens per chunk of the per-device computation (any local length works).
      backend: "xla", "pallas" or "auto" (pallas on GPU, xla elsewhere).
      initial_state: [B, H, Dk, Dv] state before the first token, or None (zeros).
      return_final_state: also return the state after the last token, [B, H, Dk, Dv] f32.
    Returns:
      o [B, T, H, Dv] in q's dtype, or (o, final_state).
    """
    return _linear_global("lasp2", q, k, v, log_decay=log_decay, causal=causal, scale=scale,
                          mesh=mesh, chunk_size=chunk_size, backend=backend,
                          initial_state=initial_state, return_final_state=return_final_state)


def linear_attention_local(q, k, v, *, log_decay=None, causal: bool = True,
                           scale: float | None = None, axis_name: str | None = "sp",
                           chunk_size: int = 64, backend: str = "auto", initial_state=None,
                           return_final_state: bool = False):
    """:func:`linear_attention` in local view, inside a ``shard_map`` over ``axis_name``.

    Shapes are the local ones ([B, L, H, Dk] with L = T / sp, ...). ``initial_state`` must be
    the same on every rank (it enters rank 0); the final state is returned on every rank.
    The caller's ``shard_map`` must use ``check_vma=False``.
    """
    return _linear_local("lasp2", q, k, v, log_decay, causal=causal, scale=scale,
                         axis_name=axis_name, chunk_size=chunk_size, backend=backend,
                         initial_state=initial_state, return_final_state=return_final_state)


def lasp1_linear_attention(q, k, v, *, log_decay=None, causal: bool = True,
                           scale: float | None = None, mesh: Mesh | None = None,
                           chunk_size: int = 64, backend: str = "auto", initial_state=None,
                           return_final_state: bool = False):
    """Baseline: :func:`linear_attention` with LASP-1's ring of W - 1 sequential hops."""
    return _linear_global("lasp1", q, k, v, log_decay=log_decay, causal=causal, scale=scale,
                          mesh=mesh, chunk_size=chunk_size, backend=backend,
                          initial_state=initial_state, return_final_state=return_final_state)


def lasp1_linear_attention_local(q, k, v, *, log_decay=None, causal: bool = True,
                                 scale: float | None = None, axis_name: str | None = "sp",
                                 chunk_size: int = 64, backend: str = "auto",
                                 initial_state=None, return_final_state: bool = False):
    """Baseline LASP-1 in local view (see :func:`linear_attention_local`)."""
    return _linear_local("lasp1", q, k, v, log_decay, causal=causal, scale=scale,
                         axis_name=axis_name, chunk_size=chunk_size, backend=backend,
                         initial_state=initial_state, return_final_state=return_final_state)


# ----------------------------------------------------------------------------- softmax

_SOFTMAX_METHODS = {"lasp2h": lasp2h_softmax, "ring": ring_softmax}


def _softmax_local(method, q, k, v, segment_ids, *, causal, scale, axis_name, backend="auto"):
    _check_qkv(q, k, v)
    backend = resolve_backend_name(backend)
    if segment_ids is not None and tuple(segment_ids.shape) != q.shape[:2]:
        raise ValueError(f"segment_ids has shape {tuple(segment_ids.shape)}; expected [B, T] = "
                         f"{q.shape[:2]}")
    scale = q.shape[3] ** -0.5 if scale is None else float(scale)
    if axis_name is None and method == "ring":
        method = "lasp2h"  # one device: both are plain blockwise attention
    kw = {} if method == "ring" else dict(backend=backend)
    return _SOFTMAX_METHODS[method](q, k, v, segment_ids, axis_name=axis_name, causal=causal,
                                    scale=scale, **kw)


def _softmax_global(method, q, k, v, *, causal, scale, mesh, segment_ids, backend="auto"):
    local = functools.partial(_softmax_local, method, causal=causal, scale=scale,
                              backend=backend)
    if mesh is None:
        return local(q, k, v, segment_ids, axis_name=None)
    _check_qkv(q, k, v)
    _check_mesh(mesh, q, k)
    seg_spec = None if segment_ids is None else P("dp", "sp")
    return jax.shard_map(functools.partial(local, axis_name="sp"), mesh=mesh,
                         in_specs=(_QKV, _QKV, _QKV, seg_spec), out_specs=_QKV,
                         check_vma=False)(q, k, v, segment_ids)


def softmax_attention(q, k, v, *, causal: bool = True, scale: float | None = None,
                      mesh: Mesh | None = None, segment_ids=None, backend: str = "auto"):
    """Softmax attention with LASP-2H sequence parallelism (all-gather of K and V over 'sp').

    Args:
      q: [B, T, H, D]; k: [B, T, Hkv, D]; v: [B, T, Hkv, Dv]; Hkv divides H (GQA: only the kv
        heads are gathered).
      causal: mask keys after the query (global positions).
      scale: default D ** -0.5.
      mesh: as in :func:`linear_attention`.
      segment_ids: [B, T] integer document ids: queries see keys of their own document only.
      backend: "xla" (blockwise jnp with an online softmax), "pallas" (flash-attention
        kernels, :mod:`lasp2_jax.kernels.softmax_pallas`; interpreted on CPU) or "auto"
        (pallas on GPU, xla elsewhere).
    Returns:
      [B, T, H, Dv] in q's dtype.
    """
    return _softmax_global("lasp2h", q, k, v, causal=causal, scale=scale, mesh=mesh,
                           segment_ids=segment_ids, backend=backend)


def softmax_attention_local(q, k, v, *, causal: bool = True, scale: float | None = None,
                            axis_name: str | None = "sp", segment_ids=None,
                            backend: str = "auto"):
    """:func:`softmax_attention` in local view, inside a ``shard_map`` over ``axis_name``."""
    return _softmax_local("lasp2h", q, k, v, segment_ids, causal=causal, scale=scale,
                          axis_name=axis_name, backend=backend)


def ring_softmax_attention(q, k, v, *, causal: bool = True, scale: float | None = None,
                           mesh: Mesh | None = None, segment_ids=None):
    """Baseline: :func:`softmax_attention` by Ring Attention (K, V passed rank to rank)."""
    return _softmax_global("ring", q, k, v, causal=causal, scale=scale, mesh=mesh,
                           segment_ids=segment_ids)


def ring_softmax_attention_local(q, k, v, *, causal: bool = True, scale: float | None = None,
                                 axis_name: str | None = "sp", segment_ids=None):
    """Baseline Ring Attention in local view."""
    return _softmax_local("ring", q, k, v, segment_ids, causal=causal, scale=scale,
                          axis_name=axis_name)
