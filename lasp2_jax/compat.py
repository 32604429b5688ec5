"""Differences between the jax versions this package supports (0.10.x on CPU, 0.11.x on GPU).

Everything that depends on the installed jax version goes through here, so that a version bump
touches one file.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pallas_interpret() -> bool:
    """Pallas kernels lower through Triton on GPU; elsewhere they run in interpret mode."""
    return jax.default_backend() != "gpu"


def matmul_operand_dtype(dtype):
    """The operand dtype of an XLA matmul of ``dtype`` inputs with float32 accumulation: their
    own on GPU, float32 elsewhere (XLA's CPU runtime has no bf16 x bf16 -> f32 dot)."""
    return dtype if jax.default_backend() == "gpu" else jnp.float32


def triton_compiler_params(num_warps: int, num_stages: int):
    """The Triton compiler parameters of a pallas_call, or None in interpret mode.

    jax 0.10 and 0.11 both name the class ``CompilerParams`` in ``pallas.triton``; older jax
    called it ``TritonCompilerParams`` and exported it from ``pallas`` itself.
    """
    if pallas_interpret():
        return None
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    cls = getattr(plt, "CompilerParams", None) or pl.TritonCompilerParams
    return cls(num_warps=num_warps, num_stages=num_stages)


def unwrap_primals(*args):
    """Values and perturbed bits of the arguments a ``custom_vjp`` forward rule gets when it is
    defined with ``symbolic_zeros=True`` (``None`` stays ``None``, and is not perturbed).

    Returns (values tuple, perturbed tuple).
    """
    values = tuple(None if a is None else a.value for a in args)
    perturbed = tuple(a is not None and a.perturbed for a in args)
    return values, perturbed


def dense_cotangent(ct):
    """A cotangent that may arrive as a symbolic zero (``symbolic_zeros=True``), as an array."""
    from jax.custom_derivatives import SymbolicZero

    if isinstance(ct, SymbolicZero):
        import jax.numpy as jnp

        return jnp.zeros(ct.shape, ct.dtype)
    return ct


def xla_backend_started() -> bool:
    """Whether JAX has started an XLA backend (after which XLA_FLAGS is no longer read). jax
    0.10 and 0.11 answer this only from ``jax._src.xla_bridge``."""
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()
