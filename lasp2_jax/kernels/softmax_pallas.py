"""Softmax attention of one rank's queries against (gathered) keys, as Pallas kernels.

The LASP-2H layout: queries [B, L, H, D] sit at global positions q_offset .. q_offset + L - 1
(q_offset may be traced: rank * L inside ``shard_map``), keys [B, S, Hkv, D] at 0 .. S - 1.
Causal attention lets query p see keys j <= p, so key blocks after a query block's last
position are never read, and a rank late in the sequence reads more blocks than an early one.

Forward (one program per (batch * head, query block)): an online softmax over the visible key
blocks keeps a running max m, sum l and accumulator; it writes o and lse = m + log l.
Backward (FlashAttention-2 style): with delta = rowsum(o * dO) and p = exp(s - lse),
ds = p * (dO v^T - delta); dq = scale * ds k (programs over query blocks), and
dk = scale * ds^T q, dv = p^T dO (programs over key blocks, per query head; the G query heads of
a kv head are summed afterwards).

``softmax_attention`` uses these kernels on GPU (``backend="auto"`` or ``"pallas"``); on CPU
``backend="pallas"`` runs them in interpret mode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lasp2_jax import compat
from lasp2_jax.kernels.pallas_forward import mm, pow2

_f32 = jnp.float32
# The offset travels as a small int32 vector (every entry the same): a block of a few
# elements is the most portable way to hand a traced scalar to a Triton program.
_OFFSET_LANES = 16


def _cdiv(a, b):
    return (a + b - 1) // b


def _pad(x, axis: int, size: int, value=0):
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def _mask(q_pos, k_pos, n_keys, causal: bool, q_seg=None, k_seg=None):
    """[bq, bk] visibility: a real key, (causal) not after the query, same document."""
    keep = (k_pos < n_keys)[None, :]
    if causal:
        keep = keep & (k_pos[None, :] <= q_pos[:, None])
    if q_seg is not None:
        keep = keep & (q_seg[:, None] == k_seg[None, :])
    return keep


def _visible_key_blocks(offset, qi, bq: int, bk: int, n_kb: int, causal: bool):
    """Key blocks a causal query block can see: those starting at or before its last query."""
    if not causal:
        return n_kb
    return jnp.clip((offset + (qi + 1) * bq + bk - 1) // bk, 0, n_kb)


def _forward_kernel(off_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, *, scale,
                    causal, bq, bk, n_kb, n_keys):
    qi = pl.program_id(1)
    offset = jnp.max(off_ref[...])
    q = q_ref[...]
    q_pos = offset + qi * bq + lax.broadcasted_iota(jnp.int32, (bq,), 0)
    q_seg = None if qs_ref is None else qs_ref[...]

    def body(j, carry):
        acc, m, l = carry
        kv = pl.ds(pl.multiple_of(j * bk, bk), bk)
        k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (bk,), 0)
        keep = _mask(q_pos, k_pos, n_keys, causal, q_seg, None if ks_ref is None else ks_ref[kv])
        s = jnp.where(keep, scale * mm(q, k_ref[kv, :], tb=True), -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - shift[:, None])
        alpha = jnp.exp(m - shift)
        v = v_ref[kv, :]
        return alpha[:, None] * acc + mm(p.astype(v.dtype), v), m_new, alpha * l + jnp.sum(p, 1)

    dv = o_ref.shape[-1]
    init = (jnp.zeros((bq, dv), _f32), jnp.full((bq,), -jnp.inf, _f32), jnp.zeros((bq,), _f32))
    n = _visible_key_blocks(offset, qi, bq, bk, n_kb, causal)
    acc, m, l = lax.fori_loop(0, n, body, init)
    seen = l > 0  # a query that sees no key (padding, or an empty document prefix) gives 0
    o_ref[...] = (acc / jnp.where(seen, l, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)


def _dq_kernel(off_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref, dq_ref,
               *, scale, causal, bq, bk, n_kb, n_keys):
    qi = pl.program_id(1)
    offset = jnp.max(off_ref[...])
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_pos = offset + qi * bq + lax.broadcasted_iota(jnp.int32, (bq,), 0)
    q_seg = None if qs_ref is None else qs_ref[...]

    def body(j, dq):
        kv = pl.ds(pl.multiple_of(j * bk, bk), bk)
        k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (bk,), 0)
        keep = _mask(q_pos, k_pos, n_keys, causal, q_seg, None if ks_ref is None else ks_ref[kv])
        k, v = k_ref[kv, :], v_ref[kv, :]
        p = jnp.where(keep, jnp.exp(scale * mm(q, k, tb=True) - lse[:, None]), 0.0)
        ds = p * (mm(do, v, tb=True) - delta[:, None])
        return dq + scale * mm(ds.astype(k.dtype), k)

    n = _visible_key_blocks(offset, qi, bq, bk, n_kb, causal)
    dq_ref[...] = lax.fori_loop(0, n, body, jnp.zeros(dq_ref.shape, _f32)).astype(dq_ref.dtype)


def _dkv_kernel(off_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref, dk_ref,
                dv_ref, *, scale, causal, bq, bk, n_qb, n_keys):
    kj = pl.program_id(1)
    offset = jnp.max(off_ref[...])
    k, v = k_ref[...], v_ref[...]
    k_pos = kj * bk + lax.broadcasted_iota(jnp.int32, (bk,), 0)
    k_seg = None if ks_ref is None else ks_ref[...]
    # Causal: query blocks that end before this key block's first key see none of it.
    first = jnp.clip((kj * bk - offset) // bq, 0, n_qb) if causal else 0

    def body(i, carry):
        dk, dv = carry
        rows = pl.ds(pl.multiple_of(i * bq, bq), bq)
        q, do = q_ref[rows, :], do_ref[rows, :]
        q_pos = offset + i * bq + lax.broadcasted_iota(jnp.int32, (bq,), 0)
        keep = _mask(q_pos, k_pos, n_keys, causal, None if qs_ref is None else qs_ref[rows],
                     k_seg)
        p = jnp.where(keep, jnp.exp(scale * mm(q, k, tb=True) - lse_ref[rows][:, None]), 0.0)
        dv = dv + mm(p.astype(do.dtype), do, ta=True)
        ds = p * (mm(do, v, tb=True) - delta_ref[rows][:, None])
        return dk + scale * mm(ds.astype(q.dtype), q, ta=True), dv

    init = (jnp.zeros(dk_ref.shape, _f32), jnp.zeros(dv_ref.shape, _f32))
    dk, dv = lax.fori_loop(first, n_qb, body, init)
    dk_ref[...], dv_ref[...] = dk.astype(dk_ref.dtype), dv.astype(dv_ref.dtype)


def _specs(H: int, G: int, L: int, S: int, bq: int, bk: int, d: int, dv: int, has_seg: bool,
           over: str):
    """BlockSpecs of (offset, q, k, v, q_seg, k_seg) for a grid (B * H, blocks of ``over``)."""
    def qmap():
        if over == "q":
            return lambda bh, i: (bh // H, i, bh % H, 0)
        return lambda bh, i: (bh // H, 0, bh % H, 0)

    def kmap():
        if over == "k":
            return lambda bh, i: (bh // H, i, (bh % H) // G, 0)
        return lambda bh, i: (bh // H, 0, (bh % H) // G, 0)

    lq = bq if over == "q" else L
    lk = bk if over == "k" else S
    specs = [pl.BlockSpec((_OFFSET_LANES,), lambda bh, i: (0,)),
             pl.BlockSpec((None, lq, None, d), qmap()),
             pl.BlockSpec((None, lk, None, d), kmap()),
             pl.BlockSpec((None, lk, None, dv), kmap())]
    if has_seg:
        specs += [pl.BlockSpec((None, lq), (lambda bh, i: (bh // H, i)) if over == "q"
                               else (lambda bh, i: (bh // H, 0))),
                  pl.BlockSpec((None, lk), (lambda bh, i: (bh // H, i)) if over == "k"
                               else (lambda bh, i: (bh // H, 0)))]
    return specs


def _row_spec(H: int, n: int, blocked: bool):
    """[B, L, H] per-query statistics (lse, delta): a block of n rows or all rows."""
    if blocked:
        return pl.BlockSpec((None, n, None), lambda bh, i: (bh // H, i, bh % H))
    return pl.BlockSpec((None, n, None), lambda bh, i: (bh // H, 0, bh % H))


def _no_seg(kernel, has_seg: bool):
    if has_seg:
        return kernel

    def wrapped(off_ref, q_ref, k_ref, v_ref, *rest):
        return kernel(off_ref, q_ref, k_ref, v_ref, None, None, *rest)

    return wrapped


def _call(kernel, grid, in_specs, out_specs, out_shape, name, num_warps=4, num_stages=2):
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=compat.triton_compiler_params(num_warps, num_stages),
        interpret=compat.pallas_interpret(), name=name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _attention(offset, q, k, v, q_seg, k_seg, causal, scale, bq, bk, n_keys):
    return _forward(offset, q, k, v, q_seg, k_seg, causal, scale, bq, bk, n_keys)[0]


def _forward(offset, q, k, v, q_seg, k_seg, causal, scale, bq, bk, n_keys):
    B, L, H, d = q.shape
    S, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
    has_seg = q_seg is not None
    kw = dict(scale=scale, causal=causal, bq=bq, bk=bk, n_kb=S // bk, n_keys=n_keys)
    in_specs = _specs(H, H // hkv, L, S, bq, bk, d, dv, has_seg, over="q")
    args = [offset, q, k, v] + ([q_seg, k_seg] if has_seg else [])
    o, lse = _call(
        _no_seg(functools.partial(_forward_kernel, **kw), has_seg), (B * H, L // bq), in_specs,
        [pl.BlockSpec((None, bq, None, dv), lambda bh, i: (bh // H, i, bh % H, 0)),
         _row_spec(H, bq, True)],
        [jax.ShapeDtypeStruct((B, L, H, dv), q.dtype), jax.ShapeDtypeStruct((B, L, H), _f32)],
        "lasp2h_flash_fwd")(*args)
    return o, lse


def _attention_fwd(offset, q, k, v, q_seg, k_seg, causal, scale, bq, bk, n_keys):
    o, lse = _forward(offset, q, k, v, q_seg, k_seg, causal, scale, bq, bk, n_keys)
    return o, (offset, q, k, v, q_seg, k_seg, o, lse)


def _attention_bwd(causal, scale, bq, bk, n_keys, res, do):
    offset, q, k, v, q_seg, k_seg, o, lse = res
    B, L, H, d = q.shape
    S, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
    G = H // hkv
    has_seg = q_seg is not None
    do = do.astype(q.dtype)
    # Rows that saw no key have lse = inf, so p = 0 there and delta does not matter.
    delta = jnp.sum(o.astype(_f32) * do.astype(_f32), axis=-1)  # [B, L, H]
    args = [offset, q, k, v] + ([q_seg, k_seg] if has_seg else [])
    common = dict(scale=scale, causal=causal, bq=bq, bk=bk, n_keys=n_keys)
    dq = _call(
        _no_seg(functools.partial(_dq_kernel, **common, n_kb=S // bk), has_seg),
        (B * H, L // bq),
        _specs(H, G, L, S, bq, bk, d, dv, has_seg, over="q")
        + [pl.BlockSpec((None, bq, None, dv), lambda bh, i: (bh // H, i, bh % H, 0)),
           _row_spec(H, bq, True), _row_spec(H, bq, True)],
        pl.BlockSpec((None, bq, None, d), lambda bh, i: (bh // H, i, bh % H, 0)),
        jax.ShapeDtypeStruct((B, L, H, d), q.dtype), "lasp2h_flash_bwd_dq",
    )(*args, do, lse, delta)
    # dk, dv per query head, then summed over the G query heads of each kv head.
    dk_h, dv_h = _call(
        _no_seg(functools.partial(_dkv_kernel, **common, n_qb=L // bq), has_seg),
        (B * H, S // bk),
        _specs(H, G, L, S, bq, bk, d, dv, has_seg, over="k")
        + [pl.BlockSpec((None, L, None, dv), lambda bh, i: (bh // H, 0, bh % H, 0)),
           _row_spec(H, L, False), _row_spec(H, L, False)],
        [pl.BlockSpec((None, bk, None, d), lambda bh, i: (bh // H, i, bh % H, 0)),
         pl.BlockSpec((None, bk, None, dv), lambda bh, i: (bh // H, i, bh % H, 0))],
        [jax.ShapeDtypeStruct((B, S, H, d), _f32), jax.ShapeDtypeStruct((B, S, H, dv), _f32)],
        "lasp2h_flash_bwd_dkv",
    )(*args, do, lse, delta)
    dk = dk_h.reshape(B, S, hkv, G, d).sum(axis=3).astype(k.dtype)
    dv_ = dv_h.reshape(B, S, hkv, G, dv).sum(axis=3).astype(v.dtype)
    return None, dq, dk, dv_, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention(q, k, v, *, q_offset, causal: bool, scale: float, q_seg=None, k_seg=None,
                    block_q: int = 64, block_k: int = 64):
    """Softmax attention of q [B, L, H, D] at global positions q_offset + (0 .. L-1) against
    k [B, S, Hkv, D], v [B, S, Hkv, Dv] at positions 0 .. S-1 (Hkv divides H).

    q_offset: int or int32 scalar (may be traced). q_seg [B, L], k_seg [B, S]: document ids,
    or None. Returns [B, L, H, Dv] in q's dtype; a query that sees no key gives zeros.
    L, S and the head sizes need not be multiples of the blocks (padded inside).
    """
    B, L, H, D = q.shape
    S, hkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    if H % hkv:
        raise ValueError(f"kv heads ({hkv}) must divide query heads ({H})")
    bq, bk = block_q, block_k
    lp, sp = _cdiv(L, bq) * bq, _cdiv(S, bk) * bk
    d = pow2(max(D, Dv))
    q_, k_ = _pad(_pad(q, 1, lp), 3, d), _pad(_pad(k.astype(q.dtype), 1, sp), 3, d)
    v_ = _pad(_pad(v.astype(q.dtype), 1, sp), 3, d)
    qs = ks = None
    if q_seg is not None:
        qs = _pad(q_seg.astype(jnp.int32), 1, lp, -1)
        ks = _pad(k_seg.astype(jnp.int32), 1, sp, -2)
    offset = jnp.full((_OFFSET_LANES,), q_offset, jnp.int32)
    o = _attention(offset, q_, k_, v_, qs, ks, causal, float(scale), bq, bk, S)
    return o[:, :L, :, :Dv]
