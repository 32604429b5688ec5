"""benchmarks/bench_rank_local.py's calls: LASP-2 on a mesh of one device, in both forms, is
the attention itself, so the per-rank overheads it times compare equal computations."""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks import bench_kernels as BK  # noqa: E402
from benchmarks import bench_rank_local as R  # noqa: E402


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("form", ["lightning", "gla"])
def test_lasp2_forms_on_one_device_equal_the_attention(form):
    """Outputs and gradients (the decay's too where it is learned) of the three timed calls
    agree in float32 on the Pallas backend (interpret mode)."""
    B, T, H, D = 1, 192, 2, 32
    rng = np.random.default_rng()
    q, k, v, do = (jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32)
                   for _ in range(4))
    g = jnp.asarray(BK.make_decay(rng, form, B, T, H, D))
    named, g = R.rank_calls(form, "pallas", (B, T, H, D), g)
    results = {name: (fwd(q, k, v, g), fwd_bwd(q, k, v, g, do))
               for name, (fwd, fwd_bwd) in named.items()}
    o_ref, (o_ref2, grads_ref) = results["attention"]
    assert len(grads_ref) == (4 if form == "gla" else 3)
    for name in ("lasp2_state_first", "lasp2_overlap"):
        o, (o2, grads) = results[name]
        assert _rel(o, o_ref) < 1e-5 and _rel(o2, o_ref2) < 1e-5, name
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
            assert _rel(a, b) < 1e-4, name
