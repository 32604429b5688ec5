"""benchmarks/kernel_resources.py on a machine without a GPU: the lowering it compiles.

Compiling needs the `triton` package, which the tests do not install; what they check is the
part that can rot with jax: each kernel's Triton IR and launch parameters are captured from the
lowering for the "cuda" platform, one entry per kernel of the forward+backward.
"""

from __future__ import annotations

import os
import sys

import jax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import kernel_resources as KR  # noqa: E402

from lasp2_jax.kernels import pallas_backward  # noqa: E402


def test_lowered_kernels_capture_ir_and_launch_parameters():
    kernels = KR.lowered_kernels("simple_gla", B=1, T=1024, H=2, D=32)
    bwd = pallas_backward.BlockSizes()  # the backward kernels' launch parameters
    assert {"lasp2_chunk_attention_fwd", "lasp2_chunk_attention_bwd_dq",
            "lasp2_chunk_attention_bwd_dk", "lasp2_chunk_attention_bwd_dv",
            "lasp2_decay_tables"} <= set(kernels)
    text, warps, stages = kernels["lasp2_chunk_attention_bwd_dq"]
    assert "tt.func public @lasp2_chunk_attention_bwd_dq" in text
    assert (warps, stages) == (bwd.num_warps, bwd.num_stages)
    # the lowering is put back: the next trace on this CPU interprets again
    assert KR.triton_lowering.lower_jaxpr_to_triton_module.__name__ != "capture"
    assert jax.jit(lambda x: x + 1)(1) == 2
