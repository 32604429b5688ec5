"""softmax_attention (LASP-2H) and the Ring Attention baseline against dense float64 softmax."""

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
    r = rng()
    B, T, H, Hkv, D = 2 * dp, 8 * sp, 4, 2, 8
    q, k, v = normal(r, (B, T, H, D)), normal(r, (B, T, Hkv, D)), normal(r, (B, T, Hkv, D))
    seg = _segments(r, B, T) if with_segments else None
    m = mesh(dp, sp, tp)

    def ours(q, k, v):
        return method(q, k, v, causal=causal, mesh=m, segment_ids=seg)

    def oracle(q, k, v):
        return reference.softmax_attention_reference(q, k, v, causal=causal, segment_ids=seg)

    cot = [normal(r, (B, T, H, D))]
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
