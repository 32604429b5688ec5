"""The backend table: which implementation computes a device's chunk of linear attention.

A backend supplies three differentiable functions with the signatures of
:mod:`lasp2_jax.kernels.xla`: ``chunk_attention`` (causal, optional initial state, returns the
output and the final state), ``state_summary`` (the LASP-2 summary) and ``full_attention``
(bidirectional). Optionally, ``segment_summaries`` returns the forward values of the summaries
its ``chunk_attention`` computes first (which then takes them back, so that LASP-2 computes
them once) and their fold, the LASP-2 summary; and ``state_gradient`` returns the cotangent of
the attention's initial state from its outputs' cotangent by the same kernel call that the
attention's backward makes (so that XLA merges the two in LASP-2's backward). Both take the
attention's other operand (``q=`` and ``k=``) for the work they share with it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

BACKENDS = ("xla", "pallas", "auto")


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    chunk_attention: Callable
    state_summary: Callable
    full_attention: Callable
    segment_summaries: Callable | None = None
    state_gradient: Callable | None = None
    # chunk_attention takes late_state=True: the initial state's term after the kernels
    late_state: bool = False


def resolve_backend_name(backend: str) -> str:
    """'auto' -> 'pallas' on GPU, 'xla' elsewhere; validates the name."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        return "pallas" if jax.default_backend() == "gpu" and _pallas_available() else "xla"
    return backend


def _pallas_available() -> bool:
    try:
        from lasp2_jax.kernels import pallas  # noqa: F401
    except ImportError:
        return False
    return True


def get_backend(backend: str = "auto") -> Backend:
    name = resolve_backend_name(backend)
    if name == "xla":
        from lasp2_jax.kernels import xla

        return Backend("xla", xla.chunk_linear_attention, xla.state_summary,
                       xla.full_linear_attention)
    from lasp2_jax.kernels import pallas

    return pallas.BACKEND
