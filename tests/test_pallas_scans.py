"""The cumulative-sum kernels of the Pallas backend against numpy, on fresh random inputs."""

from __future__ import annotations

import numpy as np
import pytest

from lasp2_jax.kernels import pallas_scans, reference

RNG = np.random.default_rng()


@pytest.mark.parametrize("per_dim", [False, True])
def test_decay_tables_match_chunked_cumsums(per_dim):
    B, T, H, Dk, C = 2, 96, 3, 16, 32
    shape = (B, T, H, Dk) if per_dim else (B, T, H)
    g = np.log(RNG.uniform(0.2, 1.0, shape)).astype(np.float32)
    resets = RNG.random(shape) < 0.05
    g[resets] = -np.inf
    g[RNG.random(shape) < 0.02] = -1e30  # the other spelling of a reset
    bf, cnt = pallas_scans.decay_tables(g, C)

    is_reset = g < pallas_scans.RESET_LOG_DECAY
    finite = np.where(is_reset, 0.0, g).astype(np.float64)
    chunked = (B, T // C, C, *shape[2:])
    want_bf = np.cumsum(finite.reshape(chunked), axis=2).reshape(shape)
    want_cnt = np.cumsum(is_reset.reshape(chunked), axis=2).reshape(shape)
    if not per_dim:  # scalar tables come head-major
        want_bf, want_cnt = np.moveaxis(want_bf, 2, 1), np.moveaxis(want_cnt, 2, 1)
    np.testing.assert_allclose(np.asarray(bf), want_bf, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cnt), want_cnt)


def test_reverse_decay_sums_match_reverse_cumsum():
    """Several chunks, the final-state term at the last token."""
    B, T, H, Dk, C = 2, 128, 2, 32, 32
    dbq, dbk = (RNG.standard_normal((B, T, H, Dk)).astype(np.float32) for _ in range(2))
    final = RNG.standard_normal((B, H, Dk)).astype(np.float32)
    got = np.asarray(pallas_scans.reverse_decay_sums(dbq, dbk, final, C))
    want = reference.reverse_decay_sums_reference(dbq, dbk, final)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_reverse_decay_sums_at_two_shapes_in_one_process():
    """The reverse sums at the oracle checks' two shapes, one after the other (their index maps
    are the same; only the arrays' shapes differ)."""
    for B, T, H, Dk in ((2, 384, 2, 128), (1, 4160, 4, 128)):
        dbq, dbk = (RNG.standard_normal((B, T, H, Dk)).astype(np.float32) for _ in range(2))
        final = RNG.standard_normal((B, H, Dk)).astype(np.float32)
        got = np.asarray(pallas_scans.reverse_decay_sums(dbq, dbk, final, 64))
        want = reference.reverse_decay_sums_reference(dbq, dbk, final)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)
