"""Linear-Llama3 and its token mixers (basic, lightning, retention, gla, based, rebased,
softmax), in Flax linen with logical axis names on every parameter.
"""

from lasp2_jax.models.config import MIXERS, ModelConfig
from lasp2_jax.models.llama import Block, LinearLlama3, output_matrix, param_count
from lasp2_jax.models.mixers import MIXER_CLASSES

__all__ = ["MIXERS", "MIXER_CLASSES", "Block", "LinearLlama3", "ModelConfig", "output_matrix",
           "param_count"]
