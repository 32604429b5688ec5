"""benchmarks/dg_precision_study.py: with rounding switched off, every chunked form of the
decay gradient equals the float64 pair-sum oracle, and that oracle equals autodiff."""

import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import dg_precision_study as S  # noqa: E402


def _inputs(T, D, lo, hi):
    r = np.random.default_rng()
    q, k, v, do = (r.standard_normal((T, D)).astype(np.float32) * D ** -0.25 for _ in range(4))
    return q, k, v, do, -r.uniform(lo, hi, T).astype(np.float32)


def test_oracle_matches_autodiff():
    q, k, v, do, a = _inputs(48, 8, 0.01, 1.0)
    q64, k64, v64, do64 = (x.astype(np.float64) for x in (q, k, v, do))

    def loss(a):
        b = jax.numpy.cumsum(a)
        w = jax.numpy.tril(jax.numpy.exp(b[:, None] - b[None, :]))
        return jax.numpy.sum(((w * (q64 @ k64.T)) @ v64) * do64)

    with jax.enable_x64(True):
        want = jax.grad(loss)(np.asarray(a, np.float64))
    np.testing.assert_allclose(S.oracle(q, k, v, do, a), want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("lo,hi", [(0.001, 0.1), (0.5, 4.0)], ids=["weak", "strong"])
def test_unrounded_forms_match_oracle(monkeypatch, lo, hi):
    monkeypatch.setattr(S, "bf16", lambda x: np.asarray(x, np.float32))
    monkeypatch.setattr(S, "fp16_significand", lambda x: np.asarray(x, np.float32))
    q, k, v, do, a = _inputs(256, 16, lo, hi)
    ref = S.oracle(q, k, v, do, a)
    assert S.rel_err(S.crossing_form(q, k, v, do, a, 32), ref) < 1e-4
    assert S.rel_err(S.crossing_form(q, k, v, do, a, 32, passing_from_totals=True), ref) < 1e-4
    assert S.rel_err(S.difference_form(q, k, v, do, a, 32, split=True), ref) < 1e-3
    for state in S.STATE_ROUNDING:
        assert S.rel_err(S.kernel_difference_form(q, k, v, do, a, 32, state), ref) < 1e-4
    for group in (1, 3):  # 3: the last group of the 8 chunks is shorter
        assert S.rel_err(S.anchored_form(q, k, v, do, a, 32, group), ref) < 1e-4
    for product in S.PRODUCTS:
        assert S.rel_err(S.anchored_form(q, k, v, do, a, 32, 3, product), ref) < 1e-4


def test_fp16_significand_keeps_eleven_bits():
    x = np.random.default_rng().standard_normal(1000).astype(np.float32) * 1e6
    err = np.abs(S.fp16_significand(x) - x) / np.abs(x)
    assert err.max() <= 2.0 ** -11 and err.max() > 2.0 ** -14
