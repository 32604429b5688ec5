"""Shared test utilities: fresh random inputs, float64 oracle evaluation, relative errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import lasp2_jax


def rng():
    """A fresh generator per test: every run draws new inputs."""
    return np.random.default_rng()


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a)), "result has NaN or inf"
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def normal(r, shape, dtype=jnp.float32):
    return jnp.asarray(r.standard_normal(shape), dtype)


def log_decay(r, form, B, T, H, Dk):
    """Random log decays in [-0.6, -0.01] for a decay form name."""
    shapes = {"none": None, "head": (H,), "token": (B, T, H), "dim": (B, T, H, Dk)}
    shape = shapes[form]
    return None if shape is None else jnp.asarray(-r.uniform(0.01, 0.6, shape), jnp.float32)


def mesh(dp, sp, tp):
    return lasp2_jax.make_mesh(dp=dp, sp=sp, tp=tp, devices=jax.devices()[: dp * sp * tp])


def as64(x):
    return None if x is None else np.asarray(x, np.float64)


def value_and_grads(fn, args, cotangents):
    """Outputs of ``fn(*args)`` and the gradients of <outputs, cotangents> w.r.t. every
    non-None argument (None where an argument is None)."""
    out = fn(*args)
    idx = [i for i, a in enumerate(args) if a is not None]

    def loss(*diff):
        full = list(args)
        for i, d in zip(idx, diff):
            full[i] = d
        outs = fn(*full)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return sum(jnp.sum(o * c) for o, c in zip(outs, cotangents))

    grads = jax.grad(loss, argnums=tuple(range(len(idx))))(*[args[i] for i in idx])
    full = [None] * len(args)
    for i, gr in zip(idx, grads):
        full[i] = gr
    return out, full


def in_float64(fn, args, cotangents):
    """:func:`value_and_grads` of an oracle in float64."""
    with jax.enable_x64(True):
        out, grads = value_and_grads(fn, [as64(a) for a in args],
                                     [as64(c) for c in cotangents])
        out = jax.tree.map(np.asarray, out)
        grads = [None if g is None else np.asarray(g) for g in grads]
    return out, grads
