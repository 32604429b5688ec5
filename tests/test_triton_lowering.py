"""The Pallas kernels lower to Triton for a CUDA GPU, checked on a machine without one.

Elsewhere on CPU the kernels run in interpret mode, which never builds their Triton IR. Here
``compat.pallas_interpret`` answers False and the forward+backward of each decay form (and of
the softmax layers' flash kernels) is lowered for the "cuda" platform: every kernel becomes a
Triton custom call, and an op that Triton's lowering refuses (such as jnp's remainder, a
nested jit whose lowering once mixed an i32 with an i1) fails here instead of on the GPU.
Compiling the IR needs a GPU; this does not.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import triton as _  # noqa: F401  (registers the CUDA lowering)

from lasp2_jax import compat
from lasp2_jax.kernels import pallas, pallas_forward, softmax_pallas

B, T, H, D = 1, 512, 2, 32
# Two segments of 4 chunks of 64: the summary kernels run, and the decay gradient is anchored
# in groups of 4 chunks (an odd chunk count would send GLA's to the split form).
CONFIG = pallas.Config(pallas_forward.BlockSizes(min_programs=4))
CUSTOM_CALL = "__gpu$xla.gpu.triton"
_GRADIENT_KERNELS = {"lasp2_chunk_attention_fwd", "lasp2_chunk_attention_bwd_dq",
                     "lasp2_chunk_attention_bwd_dk", "lasp2_chunk_attention_bwd_dv",
                     "lasp2_segment_summary", "lasp2_segment_summary_bwd"}
KERNELS = {
    "none": _GRADIENT_KERNELS,
    "scalar": _GRADIENT_KERNELS | {"lasp2_decay_tables"},
    # the three branches of the per-dimension choice: the prescaled kernels without and with
    # document masks (suffix _docs), and the exact ones
    "per_dim": _GRADIENT_KERNELS | {"lasp2_decay_tables", "lasp2_reverse_decay_sums",
                                    "lasp2_prescale"} | {
        f"lasp2_prescaled_{name}{docs}" for docs in ("", "_docs")
        for name in ("fwd", "summary", "summary_bwd", "bwd_dq", "bwd_dk", "bwd_dv")},
}


@pytest.fixture
def triton_kernels(monkeypatch):
    """Kernels traced as for the GPU (the jit caches cleared on both sides, so that no trace
    in interpret mode is reused, nor this one afterwards)."""
    monkeypatch.setattr(compat, "pallas_interpret", lambda: False)
    jax.clear_caches()
    yield
    jax.clear_caches()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("form", list(KERNELS))
def test_forward_and_backward_lower_to_triton(form, dtype, triton_kernels):
    plan = pallas._plan(B, T, H, D, D, form, 64, CONFIG)
    assert (plan.segments, plan.t_pad // plan.segments // plan.chunk) == (2, 4)
    x = jnp.zeros((B, T, H, D), dtype)
    g = {"none": None, "scalar": jnp.zeros((B, T, H)),
         "per_dim": jnp.zeros((B, T, H, D))}[form]

    def fwd_bwd(q, k, v, g_, do):
        def attention(*a):
            return pallas.chunk_linear_attention(*a, scale=D ** -0.5, config=CONFIG)
        (o, st), vjp = jax.vjp(attention, q, k, v, g_)
        return o, vjp((do, jnp.zeros_like(st)))

    _assert_triton_kernels(fwd_bwd, (x, x, x, g, x), KERNELS[form])


@pytest.mark.parametrize("form", list(KERNELS))
def test_late_state_lowers_to_triton(form, triton_kernels):
    """With late_state (LASP-2's overlapped form) the incoming state's term is a kernel of its
    own; the exact per-dimension branch takes the state at once."""
    x = jnp.zeros((B, T, H, D), jnp.bfloat16)
    g = {"none": None, "scalar": jnp.zeros((B, T, H)),
         "per_dim": jnp.zeros((B, T, H, D))}[form]

    def fwd_bwd(q, k, v, g_, s0, do):
        def attention(*a):
            return pallas.chunk_linear_attention(*a[:4], scale=D ** -0.5, config=CONFIG,
                                                 initial_state=a[4], late_state=True)
        (o, st), vjp = jax.vjp(attention, q, k, v, g_, s0)
        return o, vjp((do, jnp.zeros_like(st)))

    s0 = jnp.zeros((B, H, D, D))
    _assert_triton_kernels(fwd_bwd, (x, x, x, g, s0, x), KERNELS[form] | {"lasp2_state_entry"})


@pytest.mark.parametrize("segments", [False, True], ids=["plain", "documents"])
def test_flash_attention_lowers_to_triton(segments, triton_kernels):
    """The softmax layers' flash kernels (LASP-2H), causal, with document ids or without."""
    x = jnp.zeros((B, T, H, D), jnp.bfloat16)
    seg = jnp.zeros((B, T), jnp.int32) if segments else None

    def fwd_bwd(q, k, v, do):
        def attention(*a):
            return softmax_pallas.flash_attention(*a, q_offset=0, causal=True, scale=0.2,
                                                  q_seg=seg, k_seg=seg)
        o, vjp = jax.vjp(attention, q, k, v)
        return o, vjp(do)

    _assert_triton_kernels(fwd_bwd, (x, x, x, x),
                           {"lasp2h_flash_fwd", "lasp2h_flash_bwd_dq", "lasp2h_flash_bwd_dkv"})


def _assert_triton_kernels(fn, args, names):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert CUSTOM_CALL in text
    # the kernels' names (the package's own name appears in the source locations)
    assert set(re.findall(r"lasp2h?_(?!jax)[a-z0-9_]+", text)) == names
