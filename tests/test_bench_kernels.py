"""benchmarks/bench_kernels.py's packed-document decays (--doc-len), which the GPU timings of
the kernels with document masks rest on."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_kernels as BK  # noqa: E402


@pytest.mark.parametrize("form", ["basic", "lightning", "simple_gla", "gla"])
def test_doc_len_decays_reset_whole_tokens_at_document_starts(form):
    """Each token resets (-inf in every head and key dimension) or keeps the form's decay as
    drawn without documents (0 for basic, Lightning's per-head rate broadcast); the first
    token never resets, and document starts come at about 1 / doc_len of the tokens."""
    B, T, H, Dk, doc_len = 2, 4096, 3, 4, 64
    plain = BK.make_decay(np.random.default_rng(7), form, B, T, H, Dk)
    g = BK.make_decay(np.random.default_rng(7), form, B, T, H, Dk, doc_len)
    assert g.dtype == np.float32
    assert g.shape == ((B, T, H, Dk) if form == "gla" else (B, T, H))
    reset = np.isneginf(g)
    per_token = reset.reshape(B, T, -1)
    starts = per_token[..., 0]
    assert np.array_equal(per_token.all(axis=-1), starts)  # whole tokens only
    assert np.array_equal(per_token.any(axis=-1), starts)
    assert not starts[:, 0].any()
    assert 0.5 / doc_len < starts.mean() < 2.0 / doc_len
    expected = np.zeros(g.shape, np.float32) if plain is None else np.broadcast_to(
        plain, g.shape)
    np.testing.assert_array_equal(g[~reset], expected[~reset])
