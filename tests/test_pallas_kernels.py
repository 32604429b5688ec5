"""The Pallas backend against the float64 recurrence: outputs, final state and every gradient.

On CPU the kernels run in interpret mode, where outputs start as NaN: a finite result means
every element was written (the poison check). Shapes are tiny but ragged, with Dk and Dv not
powers of two, several chunks per segment and several segments per head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lasp2_jax.kernels import (
    backends,
    pallas,
    pallas_backward,
    pallas_forward,
    pallas_prescaled,
    reference,
)

RNG = np.random.default_rng()


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _inputs(B, T, H, Dk, Dv, form, resets=False):
    q, k = (RNG.standard_normal((B, T, H, Dk)).astype(np.float32) for _ in range(2))
    v = RNG.standard_normal((B, T, H, Dv)).astype(np.float32)
    g = None
    if form == "lightning":  # fixed per head, broadcast to the canonical [B, T, H]
        g = np.broadcast_to(-np.linspace(0.05, 1.0, H, dtype=np.float32), (B, T, H)).copy()
    elif form == "scalar":
        g = np.log(RNG.uniform(0.3, 1.0, (B, T, H))).astype(np.float32)
    elif form == "strong":  # chunks decay below FACTOR_LOG_DECAY: the exact pair weights
        g = np.log(RNG.uniform(1e-3, 1e-2, (B, T, H))).astype(np.float32)
    elif form == "per_dim":
        g = np.log(RNG.uniform(0.3, 1.0, (B, T, H, Dk))).astype(np.float32)
    elif form == "gla":  # mild per-dimension decays: every chunk takes the prescaled kernels
        g = np.log(RNG.uniform(0.9, 1.0, (B, T, H, Dk))).astype(np.float32)
    if resets and g is not None:
        g[:, T // 4] = -np.inf
        g[:, T // 2] = -1e30
        g[:, T // 2 + 1] = -np.inf
        if form == "per_dim":  # a reset of a single key dimension: the exact kernels
            g[:, 3 * T // 4, :, 1] = -np.inf
    s0 = RNG.standard_normal((B, H, Dk, Dv)).astype(np.float32)
    return q, k, v, g, s0


def _reference_vjp(q, k, v, g, s0, scale, do, dst):
    """Outputs, final state and the gradients of <o, do> + <S_T, dst>, in float64."""
    with jax.enable_x64(True):
        def f(q_, k_, v_, g_, s_):
            return reference.linear_attention_recurrent(q_, k_, v_, g_, scale=scale,
                                                        initial_state=s_)
        args = [None if x is None else jnp.asarray(x, jnp.float64) for x in (q, k, v, g, s0)]
        (o, st), vjp = jax.vjp(f, *args)
        grads = vjp((jnp.asarray(do, jnp.float64), jnp.asarray(dst, jnp.float64)))
        return [np.asarray(o), np.asarray(st)] + [None if x is None else np.asarray(x)
                                                  for x in grads]


CASES = [
    # id, (B, T, H, Dk, Dv), form, resets, chunk
    ("basic", (2, 77, 2, 24, 20), "none", False, 16),
    ("lightning", (1, 100, 3, 16, 16), "lightning", False, 16),
    ("scalar", (1, 90, 2, 40, 24), "scalar", False, 16),
    ("scalar-resets-c32", (1, 130, 2, 20, 36), "scalar", True, 32),
    # two segments: one with resets (exact pair weights), one without (factorised)
    ("scalar-resets-c64", (1, 140, 2, 24, 16), "scalar", True, 64),
    ("scalar-strong", (1, 100, 2, 16, 16), "strong", False, 32),
    ("per_dim", (1, 70, 2, 24, 20), "per_dim", False, 16),
    ("per_dim-resets", (1, 64, 2, 18, 16), "per_dim", True, 16),
    # chunks of 64: the matmul fast path, and sub-chunks of 16 where a chunk has a reset
    ("per_dim-c64-mixed", (1, 150, 2, 40, 24), "per_dim", True, 64),
    # packed documents (whole tokens reset) on the prescaled kernels, segments of one chunk
    ("gla-docs", (1, 100, 2, 24, 20), "gla", True, 16),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_chunk_attention_matches_recurrence(case):
    _check_case(case)


@pytest.fixture
def crossing_dg(monkeypatch):
    """The crossing form of the scalar decay gradient (sums over the pairs that cross each
    position, the entering states stored by dq for dk) instead of the default difference form
    (traced anew: the jit caches are cleared before and after)."""
    monkeypatch.setattr(pallas_forward, "CROSSING_DG_MODES", frozenset({pallas_forward.SCALAR}))
    jax.clear_caches()
    yield
    jax.clear_caches()


# The crossing form is the alternative, not the default: its hardest cases (resets over two
# segments, strong decays) keep it tested at a fraction of the suite's time.
SCALAR_CASES = [c for c in CASES if c[0] in ("scalar-resets-c64", "scalar-strong")]


@pytest.mark.parametrize("case", SCALAR_CASES, ids=[c[0] for c in SCALAR_CASES])
def test_crossing_decay_gradient_matches_recurrence(case, crossing_dg):
    """The learned scalar decay's gradient summed over crossing pairs, with resets, strong
    decays and several segments: every output and gradient still matches."""
    _check_case(case)


@pytest.mark.parametrize("form", ["scalar", "strong", "gla", "gla-docs"])
def test_anchored_decay_gradient_over_groups(form):
    """The anchored decay gradient (the default for a learned scalar decay and on the
    prescaled per-dimension kernels) over two segments of several groups of chunks: for a
    scalar decay segments of six chunks, so a group of four and a shorter one, with resets in
    the "scalar" case; for GLA eight chunks, two groups of four, summed by the dk kernel from
    each group's end, in "gla-docs" with packed documents (whole tokens reset, one at a
    chunk's first token, two in a row). Every output and gradient matches the oracle."""
    resets = form in ("scalar", "gla-docs")
    form = "gla" if form == "gla-docs" else form
    config = pallas.Config(pallas_forward.BlockSizes(min_programs=2))
    B, H, Dk, Dv, C = 1, 1, 24, 20, 16
    T = 256 if form == "gla" else 180
    mode = "per_dim" if form == "gla" else "scalar"
    plan = pallas._plan(B, T, H, Dk, Dv, mode, C, config)
    n_c = plan.t_pad // plan.segments // C
    if form == "gla":
        assert pallas_prescaled.ANCHORED_DG
        assert (plan.segments, n_c, pallas_prescaled.anchor_group(n_c)) == (2, 8, 4)
    else:
        assert pallas_forward.SCALAR in pallas_forward.ANCHORED_DG_MODES
        assert (plan.segments, n_c, pallas_backward.anchor_chunks(n_c)) == (2, 6, 4)
    _check_case(("anchored", (B, T, H, Dk, Dv), form, resets, C), config)
    jax.clear_caches()


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "operands"])
@pytest.mark.parametrize("form", ["scalar", "gla"])
def test_anchored_bf16_products(form, direct, monkeypatch):
    """bf16 inputs, with the anchored form's per-token products q . dq and k . dk from the
    float32 gradients (the default) or from the rounded decayed operands
    (pallas_forward.DG_DIRECT_PRODUCTS): over two segments of two groups of four chunks, with
    resets for a scalar decay, every output and gradient is within the bf16 bar of the float64
    oracle."""
    monkeypatch.setattr(pallas_forward, "DG_DIRECT_PRODUCTS", direct)
    jax.clear_caches()
    config = pallas.Config(pallas_forward.BlockSizes(min_programs=2))
    B, T, H, Dk, Dv, C = 1, 256, 1, 32, 24, 16
    mode = "per_dim" if form == "gla" else "scalar"
    plan = pallas._plan(B, T, H, Dk, Dv, mode, C, config)
    n_c = plan.t_pad // plan.segments // C
    group = pallas_prescaled.anchor_group(n_c) if form == "gla" else (
        pallas_backward.anchor_chunks(n_c))
    assert (plan.segments, n_c, group) == (2, 8, 4)
    q, k, v, g, s0 = _inputs(B, T, H, Dk, Dv, form, resets=form == "scalar")
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    do = jnp.asarray(RNG.standard_normal((B, T, H, Dv)), jnp.bfloat16)
    dst = RNG.standard_normal((B, H, Dk, Dv)).astype(np.float32)

    def f(q_, k_, v_, g_, s_):
        return pallas.chunk_linear_attention(q_, k_, v_, g_, scale=Dk ** -0.5, chunk_size=C,
                                             initial_state=s_, config=config)

    (o, st), vjp = jax.vjp(f, q, k, v, g, s0)
    got = [o, st, *vjp((do, dst))]
    r = [np.asarray(x.astype(jnp.float32)) for x in (q, k, v, do)]
    want = _reference_vjp(*r[:3], g, s0, Dk ** -0.5, r[3], dst)
    jax.clear_caches()
    for name, a, b in zip(["o", "final", "dq", "dk", "dv", "dg", "ds0"], got, want,
                          strict=True):
        a = np.asarray(jnp.asarray(a, jnp.float32))
        assert np.isfinite(a).all(), name
        assert _rel(a, b) < 1e-2, (name, _rel(a, b))


def _assert_prescaled(q, k, g, chunk: int):
    """The per-dimension decay g takes the prescaled kernels (checked on its whole chunks, Dk
    padded as pallas pads it)."""
    n = g.shape[1] // chunk * chunk
    B, _, H, Dk = q.shape
    plan = pallas._plan(B, n, H, Dk, Dk, "per_dim", chunk, pallas.DEFAULT_CONFIG)
    qp, kp, _, gp, _ = pallas._pad_operands(*(jnp.asarray(x[:, :n]) for x in (q, k, q, g)),
                                            jnp.zeros((B, H, Dk, Dk)), plan)
    ad = pallas_prescaled.prescale(qp, kp, gp, chunk).ad
    assert bool(pallas_prescaled.all_chunks_safe(ad))


def _check_case(case, config=pallas.DEFAULT_CONFIG):
    name, (B, T, H, Dk, Dv), form, resets, chunk = case
    q, k, v, g, s0 = _inputs(B, T, H, Dk, Dv, form, resets)
    do = RNG.standard_normal((B, T, H, Dv)).astype(np.float32)
    dst = RNG.standard_normal((B, H, Dk, Dv)).astype(np.float32)
    scale = Dk ** -0.5

    def f(q_, k_, v_, g_, s_):
        return pallas.chunk_linear_attention(q_, k_, v_, g_, scale=scale, chunk_size=chunk,
                                             initial_state=s_, config=config)

    if form == "gla":
        _assert_prescaled(q, k, g, chunk)
    (o, st), vjp = jax.vjp(f, q, k, v, g, s0)
    got = [o, st, *vjp((do, dst))]
    want = _reference_vjp(q, k, v, g, s0, scale, do, dst)
    names = ["o", "final", "dq", "dk", "dv", "dg", "ds0"]
    for name, a, b in zip(names, got, want, strict=True):
        if b is None:
            assert a is None
            continue
        assert a.shape == b.shape, name
        assert np.isfinite(np.asarray(a)).all(), f"{name} has unwritten (NaN) or inf elements"
        # With a strong decay dg is a sum of per-token terms much larger than itself: float32
        # keeps it to about 1e-4 (the bar for float32 is 1e-3).
        tol = 5e-4 if (name == "dg" and form == "strong") else 1e-4
        assert _rel(a, b) < tol, (name, _rel(a, b))


def test_prescale_matches_numpy_and_flags_unsafe_chunks():
    """The per-dimension decay's prescaled operands against numpy, with and without a token
    that resets the state (packed documents), and the flag that chooses them: set for
    GLA-like decays and whole-token resets, cleared by a token that resets some dimensions
    only, or by one chunk whose total log decay is below SAFE_LOG_DECAY in a single
    dimension."""
    B, T, H, D, C = 1, 64, 2, 16, 16
    q, k, _, g, _ = _inputs(B, T, H, D, D, "per_dim")
    for reset in (None, 21):
        gr = g.copy()
        if reset is not None:
            gr[:, reset] = -np.inf
        qe, ke, eb, ad, cnt = pallas_prescaled.prescale(jnp.asarray(q), jnp.asarray(k),
                                                        jnp.asarray(gr), C)
        finite = np.where(np.isinf(gr), 0.0, gr).astype(np.float64)
        b = np.cumsum(finite.reshape(B, T // C, C, H, D), axis=2)
        total = b[:, :, -1:]
        for got, want in ((qe, q.reshape(b.shape) * np.exp(b)),
                          (ke, k.reshape(b.shape) * np.exp(-b)),
                          (eb, np.exp(b)),
                          (ad, np.moveaxis(np.exp(total[:, :, 0]), 2, 1))):
            assert _rel(got, want.reshape(got.shape)) < 1e-5
        resets = np.isinf(gr[..., 0]).reshape(B, T // C, C, H)
        cnt_want = np.moveaxis(np.cumsum(resets, axis=2).reshape(B, T, H), 1, 2)
        np.testing.assert_array_equal(np.asarray(cnt), cnt_want)
        # the kernels' keys decayed to their chunk's end, kd = ke * ad, chunk by chunk
        kd_want = k.reshape(b.shape) * np.exp(total - b)
        for n in range(T // C):
            for h in range(H):
                kd = pallas_prescaled.decayed_keys(ke[0, n * C:(n + 1) * C, h], ad[0, h, n])
                assert _rel(kd, kd_want[0, n, :, h]) < 1e-5
        assert bool(pallas_prescaled.all_chunks_safe(ad))
        # an undifferentiated forward's call: the same operands without exp(b)
        bare = pallas_prescaled.prescale(jnp.asarray(q), jnp.asarray(k), jnp.asarray(gr), C,
                                         with_eb=False)
        assert bare.eb is None
        for got, want in ((bare.qe, qe), (bare.ke, ke), (bare.ad, ad), (bare.cnt, cnt)):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    for t, d, value in ((T // 2, 3, -np.inf), (5, 3, -41.0)):
        unsafe = g.copy()
        unsafe[:, t, :, d] = value
        ad = pallas_prescaled.prescale(jnp.asarray(q), jnp.asarray(k), jnp.asarray(unsafe), C).ad
        assert not bool(pallas_prescaled.all_chunks_safe(ad))


@pytest.mark.parametrize("path", ["prescaled", "exact"])
def test_per_dim_decay_paths_match_recurrence(path):
    """Both paths of a per-dimension decay on GLA-like inputs with one segment per head (the
    "per_dim" cases above have several): outputs, final state and every gradient against the
    oracle. One token's decay below SAFE_LOG_DECAY in a single dimension sends the whole call
    to the exact kernels."""
    B, T, H, Dk, Dv, C = 1, 90, 2, 24, 20, 16
    config = pallas.Config(pallas_forward.BlockSizes(min_programs=1))
    q, k, v, g, s0 = _inputs(B, T, H, Dk, Dv, "per_dim")
    if path == "exact":
        g[:, 40, 1, 5] = pallas_forward.SAFE_LOG_DECAY - 1.0
    assert pallas._plan(B, T, H, Dk, Dv, "per_dim", C, config).segments == 1
    head = [jnp.asarray(x[:, :80]) for x in (q, k, g)]  # whole chunks
    safe = pallas_prescaled.all_chunks_safe(pallas_prescaled.prescale(*head, C).ad)
    assert bool(safe) == (path == "prescaled")
    do = RNG.standard_normal((B, T, H, Dv)).astype(np.float32)
    dst = RNG.standard_normal((B, H, Dk, Dv)).astype(np.float32)

    def f(q_, k_, v_, g_, s_):
        return pallas.chunk_linear_attention(q_, k_, v_, g_, scale=0.3, chunk_size=C,
                                             initial_state=s_, config=config)

    (o, st), vjp = jax.vjp(f, q, k, v, g, s0)
    want = _reference_vjp(q, k, v, g, s0, 0.3, do, dst)
    for name, a, b in zip(["o", "final", "dq", "dk", "dv", "dg", "ds0"],
                          [o, st, *vjp((do, dst))], want, strict=True):
        assert np.isfinite(np.asarray(a)).all(), name
        assert _rel(a, b) < 1e-4, (name, _rel(a, b))


@pytest.mark.parametrize("form", ["lightning", "scalar", "per_dim"])
def test_fixed_decay_gradients(form):
    """A decay that is not differentiated (closed over) takes the backward without the decay
    gradient: dq, dk, dv and the initial-state cotangent still match the oracle."""
    B, T, H, Dk, Dv = 1, 130, 2, 24, 20
    q, k, v, g, s0 = _inputs(B, T, H, Dk, Dv, form, resets=form == "scalar")
    do = RNG.standard_normal((B, T, H, Dv)).astype(np.float32)
    dst = RNG.standard_normal((B, H, Dk, Dv)).astype(np.float32)
    backend = backends.get_backend("pallas")

    def f(q_, k_, v_, s_):
        return backend.chunk_attention(q_, k_, v_, jnp.asarray(g), scale=0.3, chunk_size=32,
                                       initial_state=s_)

    (o, st), vjp = jax.vjp(f, q, k, v, s0)
    got = [o, st, *vjp((do, dst))]
    want = _reference_vjp(q, k, v, g, s0, 0.3, do, dst)
    for name, a, b in zip(["o", "final", "dq", "dk", "dv", "ds0"], got,
                          want[:5] + want[6:], strict=True):
        assert _rel(a, b) < 1e-4, (name, _rel(a, b))


def test_summaries_given_back_match_and_are_checked():
    """The attention given segment_summaries' summaries equals the attention alone; summaries
    of another shape (another chunk size) are refused with the shape they need."""
    B, T, H, D = 1, 100, 2, 16
    q, k, v, g, _ = _inputs(B, T, H, D, D, "scalar", resets=True)
    summaries, m = pallas.segment_summaries(k, v, g, chunk_size=16)
    o, final = pallas.chunk_linear_attention(q, k, v, g, scale=0.5, chunk_size=16,
                                             segment_summaries=summaries)
    o_ref, final_ref = pallas.chunk_linear_attention(q, k, v, g, scale=0.5, chunk_size=16)
    np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(final), np.asarray(final_ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(m), np.asarray(final_ref), rtol=1e-5, atol=1e-5)
    other, _ = pallas.segment_summaries(k, v, g, chunk_size=64)
    with pytest.raises(ValueError, match="segment_summaries has shape"):
        pallas.chunk_linear_attention(q, k, v, g, scale=0.5, chunk_size=16,
                                      segment_summaries=other)


def _gla_inputs(path, B, T, H, Dk, Dv):
    """Inputs whose per-dimension decays send the attention down one path of
    pallas._per_dim_path: "prescaled" (mild decays), "documents" (whole tokens reset) or
    "exact" (one key dimension reset)."""
    q, k, v, g, s0 = _inputs(B, T, H, Dk, Dv, "gla")
    if path == "documents":
        g[:, T // 3] = -np.inf
        g[:, T // 2] = -1e30
    elif path == "exact":
        g[:, T // 3, :, 1] = -np.inf
    return q, k, v, g, s0


@pytest.mark.parametrize("path", ["prescaled", "documents", "exact"])
def test_per_dim_summaries_share_the_prescale(path):
    """Given the attention's q (as LASP-2 does), a per-dimension decay's segment summaries
    come from its prescaled operands: the attention given them back equals the attention
    alone, their fold is its final state from a zero state, and the float32 values match the
    exact kernels' (no q). Likewise state_gradient given k matches the oracle."""
    B, T, H, Dk, Dv = 1, 200, 2, 24, 20
    q, k, v, g, _ = _gla_inputs(path, B, T, H, Dk, Dv)
    plan = pallas._plan(B, T, H, Dk, Dv, "per_dim", 16, pallas.DEFAULT_CONFIG)
    taken = pallas._per_dim_prescale(jnp.asarray(q), jnp.asarray(k), jnp.asarray(g), plan)[-1]
    assert int(taken) == {"exact": pallas.EXACT, "prescaled": pallas.PRESCALED,
                          "documents": pallas.PRESCALED_RESETS}[path]
    summaries, m = pallas.segment_summaries(k, v, g, q=q, chunk_size=16)
    exact_summaries, exact_m = pallas.segment_summaries(k, v, g, chunk_size=16)
    assert summaries.shape == exact_summaries.shape
    assert _rel(summaries, exact_summaries) < 1e-5
    o, _ = pallas.chunk_linear_attention(q, k, v, g, scale=0.5, chunk_size=16,
                                         segment_summaries=summaries)
    o_ref, final_ref = pallas.chunk_linear_attention(q, k, v, g, scale=0.5, chunk_size=16)
    assert _rel(o, o_ref) < 1e-5
    assert _rel(m, final_ref) < 1e-5 and _rel(exact_m, final_ref) < 1e-5

    do = RNG.standard_normal((B, T, H, Dv)).astype(np.float32)
    ds = pallas.state_gradient(q, do, g, k=k, scale=0.5, chunk_size=16)
    zero = np.zeros((B, H, Dk, Dv), np.float32)
    want = _reference_vjp(q, k, v, g, zero, 0.5, do, zero)[6]
    assert _rel(ds, want) < 1e-4


LATE_STATE_CASES = [("none", None), ("scalar", None), ("strong", None), ("gla", "prescaled"),
                    ("gla", "documents"), ("gla", "exact"), ("scalar", "one segment")]


@pytest.mark.parametrize("form,case", LATE_STATE_CASES, ids=lambda x: str(x))
def test_late_state_matches_the_oracle(form, case):
    """late_state (the kernels from a zero state, the initial state's term added after):
    outputs, final state and every gradient match the float64 oracle, with resets, several
    segments and padding (T, Dk and Dv not multiples of the blocks), or one segment."""
    B, T, H, Dk, Dv = 1, 150, 2, 24, 20
    if form == "gla":
        q, k, v, g, s0 = _gla_inputs(case, B, T, H, Dk, Dv)
    else:
        q, k, v, g, s0 = _inputs(B, T, H, Dk, Dv, form, resets=form != "none")
    config = pallas.DEFAULT_CONFIG
    if case == "one segment":
        config = pallas.Config(pallas_forward.BlockSizes(min_programs=1))
        assert pallas._plan(B, T, H, Dk, Dv, "scalar", 16, config).segments == 1
    do = RNG.standard_normal((B, T, H, Dv)).astype(np.float32)
    dst = RNG.standard_normal((B, H, Dk, Dv)).astype(np.float32)
    learned = g is not None

    def f(q_, k_, v_, s_, g_):
        return pallas.chunk_linear_attention(q_, k_, v_, g_, scale=0.4, chunk_size=16,
                                             initial_state=s_, config=config, late_state=True)

    args = (q, k, v, s0) + ((g,) if learned else ())
    (o, st), vjp = jax.vjp(lambda *a: f(*a[:4], a[4] if learned else None), *args)
    got = [o, st, *vjp((jnp.asarray(do), jnp.asarray(dst)))]
    want = _reference_vjp(q, k, v, g, s0, 0.4, do, dst)
    names = ["o", "final", "dq", "dk", "dv", "ds0", "dg"]
    wanted = want[:5] + [want[6]] + ([want[5]] if learned else [])
    for name, a, b in zip(names[:len(got)], got, wanted, strict=True):
        assert _rel(a, b) < 1e-4, (name, _rel(a, b))


@pytest.mark.parametrize("form", ["none", "scalar", "per_dim"])
def test_state_gradient_matches_initial_state_cotangent(form):
    """state_gradient equals the oracle's initial-state cotangent when the final state's
    cotangent is zero (several segments, resets)."""
    B, T, H, Dk, Dv = 1, 120, 2, 24, 20
    q, k, v, g, s0 = _inputs(B, T, H, Dk, Dv, form, resets=form != "none")
    do = RNG.standard_normal((B, T, H, Dv)).astype(np.float32)
    scale = Dk ** -0.5
    ds = pallas.state_gradient(q, do, g, scale=scale, chunk_size=16)
    want = _reference_vjp(q, k, v, g, s0, scale, do, np.zeros_like(s0))[6]
    assert ds.shape == want.shape
    assert _rel(ds, want) < 1e-4


def test_one_segment_and_default_state():
    """A single segment per head (no summary kernels), no initial state, bf16 inputs."""
    B, T, H, Dk, Dv = 1, 50, 2, 16, 16
    q, k, v, g, _ = _inputs(B, T, H, Dk, Dv, "scalar")
    config = pallas.Config(pallas_forward.BlockSizes(min_programs=1))
    plan = pallas._plan(B, T, H, Dk, Dv, "scalar", 16, config)
    assert plan.segments == 1
    qb, kb, vb = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))

    def f(q_, k_, v_, g_):
        o, st = pallas.chunk_linear_attention(q_, k_, v_, g_, scale=0.25, chunk_size=16,
                                              config=config)
        return jnp.sum(o.astype(jnp.float32) * o.astype(jnp.float32)) + jnp.sum(st)

    grads = jax.grad(f, argnums=(0, 1, 2, 3))(qb, kb, vb, g)
    r = [np.asarray(jnp.asarray(x, jnp.float32)) for x in (qb, kb, vb)]
    with jax.enable_x64(True):
        def f64(q_, k_, v_, g_):
            o, st = reference.linear_attention_recurrent(q_, k_, v_, g_, scale=0.25)
            return jnp.sum(o * o) + jnp.sum(st)
        want = jax.grad(f64, argnums=(0, 1, 2, 3))(*(jnp.asarray(x, jnp.float64)
                                                    for x in (*r, g)))
    for a, b in zip(grads, want, strict=True):
        assert np.isfinite(np.asarray(a, np.float32)).all()
        assert _rel(np.asarray(a, np.float32), b) < 1e-2


@pytest.mark.parametrize("form", ["none", "scalar", "per_dim"])
def test_state_summary(form):
    B, T, H, Dk, Dv = 1, 45, 2, 12, 20
    _, k, v, g, _ = _inputs(B, T, H, Dk, Dv, form, resets=form != "none")
    dm = RNG.standard_normal((B, H, Dk, Dv)).astype(np.float32)
    dtotal = RNG.standard_normal((B, H, Dk)).astype(np.float32)
    backend = backends.get_backend("pallas")
    (m, total), vjp = jax.vjp(lambda k_, v_, g_: backend.state_summary(k_, v_, g_), k, v, g)
    dk, dv, dg = vjp((dm, dtotal))
    with jax.enable_x64(True):
        def f64(k_, v_, g_):
            m_ = reference.linear_attention_recurrent(jnp.zeros_like(k_), k_, v_, g_,
                                                      scale=1.0)[1]
            if g_ is None:
                return m_, jnp.zeros((B, H, Dk))
            tot = jnp.sum(g_, axis=1)
            return m_, tot if g_.ndim == 4 else jnp.broadcast_to(tot[..., None], (B, H, Dk))
        args = [None if x is None else jnp.asarray(x, jnp.float64) for x in (k, v, g)]
        (rm, rtotal), rvjp = jax.vjp(f64, *args)
        rdk, rdv, rdg = rvjp((jnp.asarray(dm, jnp.float64), jnp.asarray(dtotal, jnp.float64)))
    assert _rel(m, rm) < 1e-4
    np.testing.assert_array_equal(np.isfinite(total), np.isfinite(np.asarray(rtotal)))
    fin = np.isfinite(np.asarray(rtotal))
    assert np.allclose(np.asarray(total)[fin], np.asarray(rtotal)[fin], rtol=1e-5, atol=1e-5)
    assert _rel(dk, rdk) < 1e-4 and _rel(dv, rdv) < 1e-4
    if g is not None:
        assert np.isfinite(np.asarray(dg)).all()
        assert _rel(dg, rdg) < 1e-4


def test_full_attention():
    B, T, H, Dk, Dv = 2, 33, 2, 12, 10
    q, k, v, _, s0 = _inputs(B, T, H, Dk, Dv, "none")
    o, st = backends.get_backend("pallas").full_attention(q, k, v, scale=0.3, initial_state=s0)
    with jax.enable_x64(True):
        ro, rst = reference.linear_attention_recurrent(
            *(jnp.asarray(x, jnp.float64) for x in (q, k, v)), causal=False, scale=0.3,
            initial_state=jnp.asarray(s0, jnp.float64))
    assert _rel(o, ro) < 1e-5 and _rel(st, rst) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["none", "scalar", "per_dim", "gla", "gla-docs"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gpu_matches_recurrence(form, dtype):
    """The Triton kernels on the GPU: bf16 below 1e-2, f32 below 1e-3, and the same bits on a
    second run (no race). "per_dim" has resets of single dimensions (the exact kernels), "gla"
    none and "gla-docs" whole-token resets (both prescaled)."""
    _gpu_check((1, 1000 + 37, 4, 72, 128), form, dtype, pallas.DEFAULT_CONFIG)


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["scalar", "gla", "gla-docs"])
def test_gpu_anchored_groups_of_four(form):
    """The anchored decay gradient on the GPU in groups of four chunks (one segment of 16
    chunks of 64), bf16, learned scalar and per-dimension (prescaled) decays, the latter also
    with packed documents."""
    config = pallas.Config(pallas_forward.BlockSizes(min_programs=4))
    shape = (1, 1024, 2, 128, 128)
    plan = pallas._plan(*shape, "per_dim" if form.startswith("gla") else "scalar", 64, config)
    n_c = plan.t_pad // plan.segments // plan.chunk
    assert (plan.segments, n_c, pallas_prescaled.anchor_group(n_c),
            pallas_backward.anchor_chunks(n_c)) == (1, 16, 4, 4)
    _gpu_check(shape, form, "bfloat16", config)


def _gpu_check(shape, form, dtype, config):
    """form: one of _inputs', with resets except "none" and "gla"; "gla-docs": "gla" with."""
    B, T, H, Dk, Dv = shape
    resets = form not in ("none", "gla")
    form = "gla" if form == "gla-docs" else form
    q, k, v, g, s0 = _inputs(B, T, H, Dk, Dv, form, resets=resets)
    if form == "gla":
        _assert_prescaled(q, k, g, 64)
    do = RNG.standard_normal((B, T, H, Dv)).astype(np.float32)
    dst = RNG.standard_normal((B, H, Dk, Dv)).astype(np.float32)
    dt = jnp.dtype(dtype)
    q, k, v, do = (np.asarray(jnp.asarray(x, dt).astype(jnp.float32)) for x in (q, k, v, do))

    @jax.jit
    def run(q_, k_, v_, g_, s_, do_, dst_):
        def f(*a):
            return pallas.chunk_linear_attention(*a[:4], scale=Dk ** -0.5, initial_state=a[4],
                                                 config=config)
        (o, st), vjp = jax.vjp(f, q_, k_, v_, g_, s_)
        return [o, st, *vjp((do_, dst_))]

    args = [jnp.asarray(x, dt) for x in (q, k, v)] + [g, s0, jnp.asarray(do, dt), dst]
    got, again = run(*args), run(*args)
    want = _reference_vjp(q, k, v, g, s0, Dk ** -0.5, do, dst)
    tol = 1e-2 if dtype == "bfloat16" else 1e-3
    for a, a2, b in zip(got, again, want, strict=True):
        if b is None:
            continue
        np.testing.assert_array_equal(np.asarray(a), np.asarray(a2))
        assert _rel(np.asarray(a, np.float32), b) < tol


@pytest.mark.gpu
def test_gpu_decay_gradient_after_another_shape():
    """GLA's decay gradient at the oracle checks' benchmark shape after a call at their small
    shape, in one process, against the XLA backend: on an H100 this sequence once gave a wrong
    decay gradient (relative error 0.45) with every other output right."""
    for B, T, H, D in ((2, 333, 2, 72), (1, 4096 + 37, 4, 128)):
        q, k, v, g, s0 = _inputs(B, T, H, D, D, "gla")
        do = RNG.standard_normal((B, T, H, D)).astype(np.float32)
        dst = RNG.standard_normal((B, H, D, D)).astype(np.float32)
        got, want = (_decay_gradient(backends.get_backend(name), q, k, v, g, s0, do, dst)
                     for name in ("pallas", "xla"))
        assert _rel(got, want) < 1e-3, (B, T, H, D)


def _decay_gradient(backend, q, k, v, g, s0, do, dst):
    """d (<o, do> + <S_T, dst>) / d g of the backend's causal attention (scale Dk^-0.5). The
    final state's term matters: it enters the reverse sums at the last token only."""
    def loss(g_):
        o, st = backend.chunk_attention(q, k, v, g_, scale=q.shape[-1] ** -0.5,
                                        initial_state=s0)
        return jnp.sum(o * do) + jnp.sum(st * dst)
    return np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(g)))
