"""Per-device compute of linear attention: the recurrent/quadratic oracles, the chunked jnp
backend and the Pallas kernels. Nothing here communicates; `lasp2_jax.parallel` does.
"""

from lasp2_jax.kernels.backends import Backend, get_backend, resolve_backend_name

__all__ = ["Backend", "get_backend", "resolve_backend_name"]
