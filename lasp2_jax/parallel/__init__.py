"""Sequence parallelism: LASP-2 and LASP-2H, the cross-rank scans, and the LASP-1 and Ring
Attention baselines. Global-view entry points live in :mod:`lasp2_jax.attention`.
"""

_BASELINES = (
    "lasp1_linear_attention",
    "lasp1_linear_attention_local",
    "ring_softmax_attention",
    "ring_softmax_attention_local",
)
__all__ = list(_BASELINES)


def __getattr__(name):
    # Lazy: lasp2_jax.attention imports the modules of this package.
    if name in _BASELINES:
        from lasp2_jax import attention

        return getattr(attention, name)
    raise AttributeError(name)
