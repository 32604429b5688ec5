"""lasp2_jax: LASP-2 sequence parallelism for linear-attention and hybrid transformers."""

from lasp2_jax.attention import (
    linear_attention,
    linear_attention_local,
    softmax_attention,
    softmax_attention_local,
)
from lasp2_jax.mesh import logical_axis_rules, logical_to_spec, make_mesh

__all__ = [
    "linear_attention",
    "linear_attention_local",
    "logical_axis_rules",
    "logical_to_spec",
    "make_mesh",
    "softmax_attention",
    "softmax_attention_local",
]
__version__ = "0.1.0"
