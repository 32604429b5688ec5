"""softmax_attention (LASP-2H) and the Ring Attention baseline against dense float64 softmax."""

import functools

import jax
import numpy as np
import pytest
from helpers import in_float64, mesh, normal, rel_err, rng, value_and_grads

import lasp2_jax
from lasp2_jax.kernels import reference
from lasp2_jax.kernels.softmax_xla import blockwise_attention
from lasp2_jax.parallel import ring_softmax_attention

TOL = 1e-4


def _segments(r, B, T):
    """Random document ids, non-decreasing along T (packed documents)."""
    starts = r.random((B, T)) < 0.15
    starts[:, 0] = True
    return np.cumsum(starts, axis=1).astype(np.int32)


@pytest.mark.parametrize("with_segments", [False, True], ids=["plain", "documents"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("method", [lasp2_jax.softmax_attention, ring_softmax_attention],
                         ids=["lasp2h", "ring"])
@pytest.mark.parametrize("dp,sp,tp", [(1, 1, 1), (2, 2, 1), (1, 4, 2), (1, 8, 1)],
                         ids=lambda x: str(x))
def test_matches_dense_oracle(dp, sp, tp, method, causal, with_segments):
    _check(method, dp=dp, sp=sp, tp=tp, local_len=8, D=8, Dv=8, causal=causal,
           with_segments=with_segments)


def _check(method, *, dp, sp, tp, local_len, D, Dv, causal, with_segments):
    """Outputs and q, k, v gradients of ``method`` over a (dp, sp, tp) mesh against dense
    float64 softmax attention (4 query heads on 2 kv heads)."""
    r = rng()
    B, T, H, Hkv = 2 * dp, local_len * sp, 4, 2
    q, k, v = normal(r, (B, T, H, D)), normal(r, (B, T, Hkv, D)), normal(r, (B, T, Hkv, Dv))
    seg = _segments(r, B, T) if with_segments else None
    m = mesh(dp, sp, tp)

    def ours(q, k, v):
        return method(q, k, v, causal=causal, mesh=m, segment_ids=seg)

    def oracle(q, k, v):
        return reference.softmax_attention_reference(q, k, v, causal=causal, segment_ids=seg)

    cot = [normal(r, (B, T, H, Dv))]
    o, grads = value_and_grads(jax.jit(ours), [q, k, v], cot)
    o_ref, grads_ref = in_float64(oracle, [q, k, v], cot)
    assert rel_err(o, o_ref) < TOL
    for got, want in zip(grads, grads_ref):
        assert rel_err(got, want) < TOL


def test_blocks_with_padding_match_oracle():
    """Key blocks that do not divide the length (padded, masked) change nothing."""
    r = rng()
    B, T, H, D = 1, 37, 2, 4
    q, k, v = (normal(r, (B, T, H, D)) for _ in range(3))
    o = blockwise_attention(q, k, v, q_pos=np.arange(T), causal=True, scale=0.5, block_size=8)
    with jax.enable_x64(True):
        o_ref = reference.softmax_attention_reference(
            *(np.asarray(x, np.float64) for x in (q, k, v)), scale=0.5)
    assert rel_err(o, o_ref) < TOL


def test_ring_steps_absorb_keys_in_blocks():
    """Each ring step walks its key chunk in blocks (ragged here): same result as dense."""
    import functools

    from jax.sharding import PartitionSpec as P

    from lasp2_jax.parallel.ring import ring_softmax

    r = rng()
    B, T, H, D = 1, 40, 2, 4
    q, k, v = (normal(r, (B, T, H, D)) for _ in range(3))
    spec = P(None, "sp")
    fn = jax.shard_map(functools.partial(ring_softmax, axis_name="sp", causal=True, scale=0.5,
                                         block_size=4),
                       mesh=mesh(1, 4, 1), in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)
    with jax.enable_x64(True):
        o_ref = reference.softmax_attention_reference(
            *(np.asarray(x, np.float64) for x in (q, k, v)), scale=0.5)
    assert rel_err(jax.jit(fn)(q, k, v), o_ref) < TOL


@pytest.mark.parametrize("with_segments", [False, True], ids=["plain", "documents"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("dp,sp,tp", [(1, 1, 1), (1, 4, 2)], ids=lambda x: str(x))
def test_pallas_flash_kernels_match_dense_oracle(dp, sp, tp, causal, with_segments):
    """LASP-2H with the Pallas flash-attention kernels (interpret mode on CPU): each rank's
    queries at its offset against the gathered keys; ragged blocks (L = 20 per rank, blocks of
    64 padded), head sizes not powers of two, GQA."""
    _check(functools.partial(lasp2_jax.softmax_attention, backend="pallas"), dp=dp, sp=sp,
           tp=tp, local_len=20, D=12, Dv=10, causal=causal, with_segments=with_segments)


def _offset_oracle(offset, q_seg, k_seg, scale):
    """Dense softmax of queries at global positions offset + (0 .. L-1) against keys at
    0 .. S-1 (causal, same document), GQA by repeating kv heads; a query that sees no key
    gives zeros. Returns fn(q [B, L, H, D], k, v [B, S, Hkv, D]) -> [B, L, H, Dv]."""
    def oracle(q, k, v):
        L, S, H, Hkv = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
        pos_q = offset + np.arange(L)
        keep = ((np.arange(S)[None, None, :] <= pos_q[None, :, None])
                & (q_seg[:, :, None] == k_seg[:, None, :]))[:, None]  # [B, 1, L, S]
        kk, vv = (jax.numpy.repeat(x, H // Hkv, axis=2) for x in (k, v))
        logits = scale * jax.numpy.einsum("blhd,bshd->bhls", q, kk)
        p = jax.nn.softmax(jax.numpy.where(keep, logits, -jax.numpy.inf), axis=-1)
        p = jax.numpy.where(keep.any(-1, keepdims=True), p, 0.0)
        return jax.numpy.einsum("bhls,bshd->blhd", p, vv)

    return oracle


def test_flash_kernel_small_blocks_and_late_offset():
    """Several query and key blocks, a query offset past the first key blocks (the causal
    loop bounds), and a query that sees no key of its document (zeros, finite gradients)."""
    from lasp2_jax.kernels.softmax_pallas import flash_attention

    r = rng()
    B, L, S, H, D = 1, 40, 100, 2, 16
    q, k, v = normal(r, (B, L, H, D)), normal(r, (B, S, H, D)), normal(r, (B, S, H, D))
    k_seg = np.zeros((B, S), np.int32)
    q_seg = np.zeros((B, L), np.int32)
    q_seg[:, 5] = 7  # no key has document 7
    offset = 55
    cot = [normal(r, (B, L, H, D))]

    def ours(q, k, v):
        return flash_attention(q, k, v, q_offset=offset, causal=True, scale=0.25,
                               q_seg=q_seg, k_seg=k_seg, block_q=16, block_k=16)

    o, grads = value_and_grads(ours, [q, k, v], cot)
    o_ref, grads_ref = in_float64(_offset_oracle(offset, q_seg, k_seg, 0.25), [q, k, v], cot)
    assert np.all(np.asarray(o)[:, 5] == 0)
    assert rel_err(o, o_ref) < TOL
    for got, want in zip(grads, grads_ref):
        assert rel_err(got, want) < TOL


def test_unknown_softmax_backend_is_named():
    q = np.zeros((1, 8, 2, 4), np.float32)
    with pytest.raises(ValueError, match="backend='cuda'"):
        lasp2_jax.softmax_attention(q, q, q, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gpu_flash_kernels_match_oracle(dtype):
    """The flash-attention kernels compiled by Triton: a rank's queries at an offset past some
    key blocks, documents, GQA, ragged lengths; bf16 below 1e-2, f32 below 2e-3, and the same
    bits on a second run (no race)."""
    from lasp2_jax.kernels.softmax_pallas import flash_attention

    r = rng()
    B, L, S, H, Hkv, D = 1, 700, 1500, 4, 2, 128
    offset = S - L
    dt = jax.numpy.dtype(dtype)
    q, k, v = normal(r, (B, L, H, D)), normal(r, (B, S, Hkv, D)), normal(r, (B, S, Hkv, D))
    q, k, v = (np.asarray(jax.numpy.asarray(x, dt).astype(np.float32)) for x in (q, k, v))
    k_seg = _segments(r, B, S)
    q_seg = k_seg[:, offset:]
    cot = [normal(r, (B, L, H, D))]

    @jax.jit
    def run(q, k, v, do):
        def f(q, k, v):
            return flash_attention(q, k, v, q_offset=offset, causal=True, scale=D ** -0.5,
                                   q_seg=q_seg, k_seg=k_seg)
        o, vjp = jax.vjp(f, q, k, v)
        return [o, *vjp(do)]

    args = [jax.numpy.asarray(x, dt) for x in (q, k, v, cot[0])]
    got, again = run(*args), run(*args)

    o_ref, grads_ref = in_float64(_offset_oracle(offset, q_seg, k_seg, D ** -0.5), [q, k, v],
                                  cot)
    tol = 1e-2 if dtype == "bfloat16" else 2e-3
    for a, a2, b in zip(got, again, [o_ref, *grads_ref], strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(a2))
        assert rel_err(np.asarray(a, np.float32), b) < tol
