"""The device mesh ('dp', 'sp', 'tp') and the one table that maps logical axes onto it.

Modules name logical axes only ('batch', 'sequence', 'heads', 'embed', ...); this table is the
single place that says which mesh axis shards each of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

AXES = ("dp", "sp", "tp")

# Activations: batch over data parallel, sequence over sequence parallel, heads over tensor
# parallel. Parameters: the head / mlp / vocab dimensions over 'tp'; 'embed' stays replicated
# unless FSDP shards it over 'dp' and 'sp' (see :func:`logical_axis_rules`).
_ACTIVATION_RULES = (
    ("batch", "dp"),
    ("sequence", "sp"),
    ("heads", "tp"),
    ("kv_heads", "tp"),
    ("head_dim", None),
    ("act_embed", None),
    ("act_mlp", "tp"),
    ("act_vocab", "tp"),
)
_PARAM_RULES = (
    ("embed", None),
    ("mlp", "tp"),
    ("vocab", "tp"),
    ("q_heads", "tp"),
    ("layers", None),
    ("norm", None),
    ("rank", None),
)


def logical_axis_rules(fsdp: bool = False) -> tuple[tuple[str, str | tuple | None], ...]:
    """The (logical axis, mesh axis) table; ``fsdp`` also shards 'embed' params over 'dp' and
    'sp': sequence-parallel ranks see different tokens, so for the parameters they are data
    parallel too, and ZeRO-style sharding over them divides params, grads and optimizer state
    by dp * sp (what lets the longest sequences fit)."""
    params = tuple((name, ("dp", "sp")) if name == "embed" and fsdp else (name, axis)
                   for name, axis in _PARAM_RULES)
    return _ACTIVATION_RULES + params


def logical_to_spec(logical_axes: Sequence[str | None], rules=None) -> PartitionSpec:
    """('batch', 'sequence', 'heads', None) -> PartitionSpec('dp', 'sp', 'tp', None)."""
    table = dict(logical_axis_rules() if rules is None else rules)
    unknown = [a for a in logical_axes if a is not None and a not in table]
    if unknown:
        raise ValueError(f"unknown logical axes {unknown}; known: {sorted(table)}")
    return PartitionSpec(*(None if a is None else table[a] for a in logical_axes))


def make_mesh(dp: int = 1, sp: int = 1, tp: int = 1, devices=None) -> Mesh:
    """A Mesh with axes ('dp', 'sp', 'tp') over ``devices`` (default: all devices).

    'tp' varies fastest, so tensor-parallel partners are neighbours (one host, fast links);
    'sp' next, so the all-gathers of LASP-2 also stay local where possible.
    Raises ValueError when dp * sp * tp differs from the number of devices.
    """
    for name, size in (("dp", dp), ("sp", sp), ("tp", tp)):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"{name}={size!r} must be a positive integer")
    devices = jax.devices() if devices is None else list(devices)
    if dp * sp * tp != len(devices):
        raise ValueError(
            f"dp*sp*tp = {dp}*{sp}*{tp} = {dp * sp * tp} does not match the {len(devices)} "
            f"devices available")
    return Mesh(np.asarray(devices, dtype=object).reshape(dp, sp, tp), AXES)
