"""linear_attention (LASP-2) and the LASP-1 baseline against the float64 recurrent oracle.

Each case compares the output, the final state and the gradients with respect to q, k, v,
log_decay and initial_state on fresh random inputs, for several (dp, sp, tp) meshes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import in_float64, log_decay, mesh, normal, rel_err, rng, value_and_grads

import lasp2_jax
from lasp2_jax.kernels import reference
from lasp2_jax.parallel import lasp1_linear_attention
from lasp2_jax.parallel import lasp2 as lasp2_module

TOL = 1e-4
MESHES = [(1, 1, 1), (2, 2, 1), (1, 4, 2), (1, 8, 1)]  # (dp, sp, tp)
FORMS = ["none", "head", "token", "dim"]


def _check(*, dp, sp, tp, form, causal=True, local_len=12, chunk_size=8, heads=4,
           kv_heads=2, with_state=True, method=lasp2_jax.linear_attention, scale=None,
           fixed_decay=False):
    r = rng()
    B, T, Dk, Dv = 2 * dp, local_len * sp, 8, 6
    q = normal(r, (B, T, heads, Dk))
    k = normal(r, (B, T, kv_heads, Dk))
    v = normal(r, (B, T, kv_heads, Dv))
    g = log_decay(r, form, B, T, heads, Dk)
    s0 = normal(r, (B, heads, Dk, Dv)) if with_state else None
    m = mesh(dp, sp, tp)

    def ours(q, k, v, g, s0):
        return method(q, k, v, log_decay=g, causal=causal, scale=scale, mesh=m,
                      chunk_size=chunk_size, initial_state=s0, return_final_state=True)

    def oracle(q, k, v, g, s0):
        return reference.linear_attention_recurrent(q, k, v, g, causal=causal, scale=scale,
                                                    initial_state=s0)

    cots = [normal(r, (B, T, heads, Dv)), normal(r, (B, heads, Dk, Dv))]
    args = [q, k, v, g, s0]
    if fixed_decay:  # closed over, so not differentiated: the backends skip its gradient
        ours, oracle = (functools.partial(lambda f, q, k, v, _, s0: f(q, k, v, g, s0), f)
                        for f in (ours, oracle))
        args[3] = None
    (o, final), grads = value_and_grads(jax.jit(ours), args, cots)
    (o_ref, final_ref), grads_ref = in_float64(oracle, args, cots)
    assert rel_err(o, o_ref) < TOL
    assert rel_err(final, final_ref) < TOL
    for name, got, want in zip(("dq", "dk", "dv", "dlog_decay", "dinitial_state"), grads,
                               grads_ref):
        if want is not None:
            assert got.shape == want.shape, name
            assert rel_err(got, want) < TOL, name


# "head" is "token"'s scalar path with a broadcast decay: one mesh of it is enough.
ORACLE_CASES = [(mesh_, form) for mesh_ in MESHES for form in FORMS
                if form != "head" or mesh_ == (1, 4, 2)]


@pytest.mark.parametrize("mesh_,form", ORACLE_CASES, ids=lambda x: str(x))
def test_lasp2_matches_oracle(mesh_, form):
    """GQA (4 query heads on 2 kv heads), initial and final state, ragged local length."""
    dp, sp, tp = mesh_
    _check(dp=dp, sp=sp, tp=tp, form=form)


@pytest.mark.parametrize("backend", ["xla", "pallas"])
@pytest.mark.parametrize("form", ["head", "token", "dim"])
def test_fixed_decay(form, backend):
    """A decay that is not differentiated (Lightning's, RetNet's) takes the backward without
    the decay-gradient work; the other gradients are unchanged."""
    _check(dp=1, sp=4, tp=1, form=form, fixed_decay=True,
           method=functools.partial(lasp2_jax.linear_attention, backend=backend))


@pytest.mark.parametrize("dp,sp,tp", MESHES, ids=lambda x: str(x))
def test_bidirectional_matches_oracle(dp, sp, tp):
    _check(dp=dp, sp=sp, tp=tp, form="none", causal=False)


@pytest.mark.parametrize("form", FORMS)
def test_lasp2_with_pallas_kernels_matches_oracle(form):
    """LASP-2 running the Pallas kernels (interpret mode on CPU) inside its shard_map."""
    _check(dp=1, sp=4, tp=2, form=form,
           method=functools.partial(lasp2_jax.linear_attention, backend="pallas"))


@pytest.fixture
def state_into_kernels(monkeypatch):
    """LASP-2 gathers first and starts the local attention from the incoming state (what the
    cost model picks for long local segments) instead of overlapping the gather (what it picks
    for these tiny shapes). Traced anew: the jit caches are cleared before and after."""
    monkeypatch.setattr(lasp2_module, "gather_overlap_pays", lambda *args, **kwargs: False)
    jax.clear_caches()
    yield
    jax.clear_caches()


# ("head", learned) runs the scalar kernels as "token" does; no decay is the overlapped
# tests' and the kernels' own initial-state tests' case.
STATE_FIRST_CASES = [(form, "pallas", False) for form in ("token", "dim")] + [
    ("dim", "xla", False), ("head", "pallas", True)]


@pytest.mark.parametrize("form,backend,fixed_decay", STATE_FIRST_CASES,
                         ids=["-".join(map(str, c)) for c in STATE_FIRST_CASES])
def test_lasp2_state_into_kernels_matches_oracle(form, backend, fixed_decay,
                                                 state_into_kernels):
    """The decay forms on the Pallas kernels, the XLA backend, and a fixed decay."""
    _check(dp=1, sp=4, tp=2, form=form, fixed_decay=fixed_decay,
           method=functools.partial(lasp2_jax.linear_attention, backend=backend))


def test_gather_overlap_pays_for_short_segments_on_many_ranks():
    """The cost model: overlap for 16K tokens per device over 64 ranks; the incoming state
    into the kernels for 512K tokens per device over 2 ranks (H=16, D=128, bf16)."""
    assert lasp2_module.gather_overlap_pays(64, (1, 16384, 16, 128), 128, 2)
    assert not lasp2_module.gather_overlap_pays(2, (1, 524288, 16, 128), 128, 2)
    # A backend that adds the late state by one pass: overlap already pays at 8 ranks there,
    # and still not for long segments on 2 ranks.
    assert lasp2_module.gather_overlap_pays(8, (1, 16384, 16, 128), 128, 2, late_state=True)
    assert not lasp2_module.gather_overlap_pays(4, (1, 16384, 16, 128), 128, 2, late_state=True)
    assert not lasp2_module.gather_overlap_pays(2, (1, 524288, 16, 128), 128, 2,
                                                late_state=True)


@pytest.mark.parametrize("form,local_len,chunk_size",
                         [("token", 8, 8), ("token", 5, 64), ("token", 16, 4), ("dim", 16, 4)],
                         ids=["one-chunk", "shorter-than-chunk", "four-chunks",
                              "four-chunks-per-dim"])
def test_chunking_does_not_change_results(local_len, chunk_size, form):
    _check(dp=1, sp=4, tp=1, form=form, local_len=local_len, chunk_size=chunk_size,
           scale=0.7)


def test_without_initial_state_mha():
    _check(dp=1, sp=4, tp=2, form="token", with_state=False, heads=4, kv_heads=4)


@pytest.mark.parametrize("form", ["none", "dim"])
@pytest.mark.parametrize("dp,sp,tp", [(1, 4, 2), (1, 8, 1)], ids=lambda x: str(x))
def test_lasp1_matches_oracle(dp, sp, tp, form):
    _check(dp=dp, sp=sp, tp=tp, form=form, method=lasp1_linear_attention)


def test_oracles_agree():
    """The recurrence and the quadratic masked form are independent derivations."""
    r = rng()
    B, T, H, Dk, Dv = 2, 20, 2, 4, 3
    with jax.enable_x64(True):
        q, k, v = (np.asarray(r.standard_normal((B, T, H, d))) for d in (Dk, Dk, Dv))
        g = -r.uniform(0.0, 1.0, (B, T, H, Dk))
        s0 = r.standard_normal((B, H, Dk, Dv))
        o1, _ = reference.linear_attention_recurrent(q, k, v, g, initial_state=s0)
        o2 = reference.linear_attention_quadratic(q, k, v, g, initial_state=s0)
    assert rel_err(o1, o2) < 1e-12


@pytest.mark.parametrize("backend", ["auto", "pallas"])
@pytest.mark.parametrize("reset", [-np.inf, -1e30])
@pytest.mark.parametrize("form", ["token", "dim"])
def test_state_reset_is_exact(reset, form, backend):
    """A reset decay at document starts gives exact results and finite gradients, and makes
    each document independent of what came before it. With the Pallas kernels a per-dimension
    decay takes the prescaled kernels' document masks (every dimension resets)."""
    r = rng()
    dp, sp, tp = 1, 4, 1
    B, T, H, Dk, Dv = 2, 32, 2, 4, 4
    q, k = normal(r, (B, T, H, Dk)), normal(r, (B, T, H, Dk))
    v = normal(r, (B, T, H, Dv))
    g = np.array(log_decay(r, form, B, T, H, Dk))
    starts = [0, 5, 8, 19, 26]  # document starts, some on rank boundaries
    g[:, starts] = reset
    g = jnp.asarray(g)
    m = mesh(dp, sp, tp)

    def ours(q, k, v, g):
        return lasp2_jax.linear_attention(q, k, v, log_decay=g, mesh=m, chunk_size=4,
                                          backend=backend)

    cot = [normal(r, (B, T, H, Dv))]
    o, grads = value_and_grads(jax.jit(ours), [q, k, v, g], cot)
    for x in [o, *grads]:
        assert np.all(np.isfinite(np.asarray(x)))
    # Oracle: each document alone, from a zero state.
    with jax.enable_x64(True):
        pieces = []
        for a, b in zip(starts, starts[1:] + [T]):
            gd = np.asarray(g[:, a:b], np.float64)
            gd[:, 0] = 0.0  # the reset itself is the zero initial state
            out, _ = reference.linear_attention_recurrent(
                *(np.asarray(x[:, a:b], np.float64) for x in (q, k, v)), gd)
            pieces.append(np.asarray(out))
    assert rel_err(o, np.concatenate(pieces, axis=1)) < TOL
    (o_ref,), grads_ref = in_float64(lambda *a: (reference.linear_attention_recurrent(*a)[0],),
                                     [q, k, v, g], cot)
    for got, want in zip(grads, grads_ref):
        assert rel_err(got, want) < TOL


def test_bf16_inputs():
    r = rng()
    B, T, H, Dk = 2, 64, 4, 16
    q, k, v = (normal(r, (B, T, H, Dk), jnp.bfloat16) for _ in range(3))
    g = log_decay(r, "token", B, T, H, Dk)
    o = lasp2_jax.linear_attention(q, k, v, log_decay=g, mesh=mesh(1, 4, 2), chunk_size=8)
    assert o.dtype == jnp.bfloat16
    with jax.enable_x64(True):
        o_ref, _ = reference.linear_attention_recurrent(
            *(np.asarray(x, np.float64) for x in (q, k, v)), np.asarray(g, np.float64))
    assert rel_err(o, o_ref) < 1e-2


def test_local_view_inside_callers_shard_map():
    r = rng()
    B, T, H, Dk, Dv = 2, 32, 2, 4, 4
    q, k, v = normal(r, (B, T, H, Dk)), normal(r, (B, T, H, Dk)), normal(r, (B, T, H, Dv))
    g = log_decay(r, "token", B, T, H, Dk)
    m = mesh(1, 4, 1)
    spec = jax.sharding.PartitionSpec(None, "sp")

    @jax.jit
    def loss(q, k, v, g):
        def body(q, k, v, g):
            return lasp2_jax.linear_attention_local(q, k, v, log_decay=g, chunk_size=4)

        o = jax.shard_map(body, mesh=m, in_specs=(spec,) * 4, out_specs=spec,
                          check_vma=False)(q, k, v, g)
        return jnp.sum(o * o)

    got = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, g)
    want = jax.grad(lambda *a: jnp.sum(reference.linear_attention_recurrent(*a)[0] ** 2),
                    argnums=(0, 1, 2, 3))(q, k, v, g)
    for a, b in zip(got, want):
        assert rel_err(a, b) < TOL


def test_split_state_gather_matches_oracle():
    """The Table 5 ablation: the state gather sent as 4 pieces changes nothing."""
    from jax.sharding import PartitionSpec as P

    from lasp2_jax.kernels import get_backend
    from lasp2_jax.parallel.lasp2 import lasp2_causal

    r = rng()
    B, T, H, Dk, Dv = 1, 32, 2, 8, 4
    q, k, v = normal(r, (B, T, H, Dk)), normal(r, (B, T, H, Dk)), normal(r, (B, T, H, Dv))
    g = log_decay(r, "dim", B, T, H, Dk)
    spec = P(None, "sp")

    def region(q, k, v, g):
        s0 = jnp.zeros((B, H, Dk, Dv), jnp.float32)
        return lasp2_causal(q, k, v, g, s0, "sp", 0.5, 4, get_backend("xla"), True, 4)

    fn = jax.shard_map(region, mesh=mesh(1, 4, 1), in_specs=(spec,) * 4,
                       out_specs=(spec, P()), check_vma=False)
    cots = [normal(r, (B, T, H, Dv)), normal(r, (B, H, Dk, Dv))]
    (o, final), grads = value_and_grads(jax.jit(fn), [q, k, v, g], cots)
    (o_ref, final_ref), grads_ref = in_float64(
        lambda *a: reference.linear_attention_recurrent(*a, scale=0.5), [q, k, v, g], cots)
    assert rel_err(o, o_ref) < TOL and rel_err(final, final_ref) < TOL
    for got, want in zip(grads, grads_ref):
        assert rel_err(got, want) < TOL
