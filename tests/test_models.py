"""Linear-Llama3 and its mixers: shapes, causality, document resets, feature maps, axes."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lasp2_jax.mesh import logical_axis_rules
from lasp2_jax.models import MIXERS, LinearLlama3, ModelConfig
from lasp2_jax.models import mixers as mx

SMALL = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, mlp_dim=64, dtype="float32",
             chunk_size=8)


def _model(**kw):
    cfg = ModelConfig(**{**SMALL, **kw}).validate()
    model = LinearLlama3(cfg)
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = model.init(jax.random.key(np.random.randint(1 << 30)), tokens)["params"]
    return cfg, model, nn.unbox(params)


def _tokens(B, T, V=64):
    return jnp.asarray(np.random.randint(0, V, (B, T)), jnp.int32)


@pytest.mark.parametrize("mixer", MIXERS)
def test_mixer_is_causal_and_respects_documents(mixer):
    """Logits at t depend on tokens <= t of the same document only (GQA on).

    Row 1 changes tokens after position 20: earlier logits must not move, later ones must.
    Row 2 changes the first document (tokens < 12): the second document's logits must not
    move (linear mixers reset their state at the boundary; softmax masks).
    """
    _, model, params = _model(mixer=mixer, n_kv_heads=2, n_layers=1)
    x = _tokens(1, 32)[0]
    rows = jnp.stack([x, x.at[20:].set((x[20:] + 7) % 64), x.at[:12].set((x[:12] + 5) % 64)])
    seg = jnp.broadcast_to(jnp.asarray([0] * 12 + [1] * 20, jnp.int32), (3, 32))
    out = jax.jit(model.apply)({"params": params}, rows, seg)
    assert out.shape == (3, 32, 64) and bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_allclose(out[1, :20], out[0, :20], rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(out[1, 20:] - out[0, 20:]))) > 1e-4
    np.testing.assert_allclose(out[2, 12:], out[0, 12:], rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(out[2, :12] - out[0, :12]))) > 1e-4


def test_packed_document_equals_document_alone():
    """Exact form of the reset for a hybrid (GLA + softmax with RoPE): a document packed
    after another gives the logits it has alone, although its positions are shifted."""
    _, model, params = _model(mixer="gla", softmax_every=2)
    x = _tokens(1, 48)
    seg = jnp.asarray([[0] * 19 + [1] * 29], jnp.int32)
    apply = jax.jit(model.apply)
    packed = apply({"params": params}, x, seg)
    alone = apply({"params": params}, x[:, 19:])
    np.testing.assert_allclose(packed[:, 19:], alone, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("mixer", ["basic", "based", "rebased", "softmax"])
def test_bidirectional_sees_both_sides(mixer):
    _, model, params = _model(mixer=mixer, causal=False, n_layers=1)
    x = _tokens(1, 32)
    out = jax.jit(model.apply)({"params": params},
                                jnp.concatenate([x, x.at[:, 30].set((x[:, 30] + 1) % 64)]))
    assert float(jnp.max(jnp.abs(out[0, :5] - out[1, :5]))) > 1e-6


def test_hybrid_pattern():
    cfg = ModelConfig(n_layers=8, softmax_every=4, mixer="gla")
    assert cfg.layer_mixers == ("gla",) * 3 + ("softmax",) + ("gla",) * 3 + ("softmax",)
    assert ModelConfig(n_layers=4, softmax_every=0).layer_mixers == ("basic",) * 4
    cfg = ModelConfig(n_layers=16, softmax_every=8)
    assert cfg.layer_mixers.count("softmax") == 2


def test_taylor_feature_map_reproduces_second_order_exp():
    d = 16
    q, k = np.random.randn(2, 5, d).astype(np.float32)
    pq, pk = mx.taylor_feature_map(q), mx.taylor_feature_map(k)
    assert pq.shape == (5, 1 + d + d * (d + 1) // 2)
    s = (q * k).sum(-1) / np.sqrt(d)
    np.testing.assert_allclose((pq * pk).sum(-1), 1 + s + s * s / 2, rtol=1e-5)


def test_normalized_linear_attention_matches_quadratic_form():
    B, T, H, D = 2, 24, 2, 8
    rng = np.random.default_rng()
    q, k = (jnp.asarray(np.abs(rng.normal(size=(B, T, H, D))), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.float32)
    o = mx.normalized_linear_attention(q, k, v, chunk_size=8)
    scores = jnp.einsum("bthd,bshd->bhts", q, k) * jnp.tril(jnp.ones((T, T)))
    ref = jnp.einsum("bhts,bshd->bthd", scores, v) / scores.sum(-1).transpose(0, 2, 1)[..., None]
    np.testing.assert_allclose(o, ref, rtol=1e-4, atol=1e-5)


def test_fixed_decays():
    g = mx.retention_log_decay(4)
    np.testing.assert_allclose(np.exp(g), 1 - 2.0 ** (-5 - np.arange(4)), rtol=1e-6)
    first, last = mx.lightning_log_decay(8, 0, 4), mx.lightning_log_decay(8, 3, 4)
    assert bool(jnp.all(first < 0)) and bool(jnp.all(last <= 0))
    assert bool(jnp.all(jnp.abs(last) < jnp.abs(first)))  # deeper layers remember longer
    assert bool(jnp.all(jnp.diff(first) > 0))  # later heads decay slower


def test_resets_fold_into_every_decay_form():
    seg = jnp.asarray([[0, 0, 1, 1, 2]])
    starts = np.array([[0, 0, 1, 0, 1]], bool)
    g = mx.with_resets(None, seg, 1, 5, 2)
    assert g.shape == (1, 5, 2) and np.array_equal(np.isneginf(g[..., 0]), starts)
    g = mx.with_resets(jnp.full((2,), -0.5), seg, 1, 5, 2)
    assert np.array_equal(np.isneginf(g[..., 1]), starts) and float(g[0, 0, 0]) == -0.5
    g = mx.with_resets(jnp.full((1, 5, 2, 3), -0.1), seg, 1, 5, 2)
    assert np.array_equal(np.isneginf(g[..., 1, 2]), starts)


def test_every_param_names_known_logical_axes():
    known = {name for name, _ in logical_axis_rules()}
    for mixer in MIXERS:
        cfg = ModelConfig(**{**SMALL, "mixer": mixer, "output_gate": True})
        boxed = jax.eval_shape(lambda c=cfg: LinearLlama3(c).init(
            jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
        leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        for leaf in leaves:
            assert isinstance(leaf, nn.Partitioned), leaf
            assert len(leaf.names) == len(leaf.value.shape)
            assert set(leaf.names) <= known, leaf.names


def test_gradients_are_finite_with_resets():
    """-inf decays at document starts must not leak NaN into any gradient."""
    for mixer in ("basic", "gla"):
        _, model, params = _model(mixer=mixer, n_layers=1)
        x = _tokens(1, 24)
        seg = jnp.asarray([[0] * 5 + [1] * 10 + [2] * 9])

        def loss(p, x=x, seg=seg, model=model):
            return jnp.mean(model.apply({"params": p}, x, seg) ** 2)

        grads = jax.jit(jax.grad(loss))(params)
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads)), mixer


@pytest.mark.parametrize("field,value,needle", [
    ("mixer", "mamba", "ModelConfig.mixer"),
    ("n_kv_heads", 3, "ModelConfig.n_kv_heads"),
    ("normalize", True, "ModelConfig.normalize"),
    ("backend", "triton", "ModelConfig.backend"),
    ("softmax_backend", "flash", "ModelConfig.softmax_backend"),
])
def test_bad_model_config_names_setting(field, value, needle):
    with pytest.raises(ValueError, match=needle):
        ModelConfig(**{field: value}).validate()


def test_bidirectional_rejects_decaying_mixers():
    with pytest.raises(ValueError, match="ModelConfig.causal"):
        ModelConfig(mixer="gla", causal=False).validate()


@pytest.mark.parametrize("policy", ["full", "dots", "mixer"])
def test_remat_changes_memory_not_math(policy):
    _, model, params = _model(mixer="basic", softmax_every=2)
    remat = LinearLlama3(ModelConfig(**{**SMALL, "mixer": "basic", "softmax_every": 2,
                                        "remat": policy}))
    x = _tokens(2, 16)

    def loss(p, m):
        return jnp.mean(m.apply({"params": p}, x) ** 2)

    a = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, model)
    b = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, remat)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7)


def test_mixer_remat_keeps_the_mixers_tensors(capsys):
    """remat="mixer" saves, per block, the q, k and v projections, the attention output and
    the output projection (for the backward), and no other named tensor; "full" none."""
    x = _tokens(2, 16)
    saved = {}
    for policy in ("mixer", "full"):
        cfg, model, params = _model(mixer="basic", softmax_every=2, remat=policy)
        jax.ad_checkpoint.print_saved_residuals(
            lambda p, m=model: jnp.mean(m.apply({"params": p}, x) ** 2), params)
        lines = capsys.readouterr().out.splitlines()
        saved[policy] = sorted(n for n in ("mixer_heads", "mixer_attention", "mixer_out")
                               for line in lines if f"named '{n}'" in line)
    per_block = ["mixer_attention", "mixer_heads", "mixer_heads", "mixer_heads", "mixer_out"]
    assert saved["mixer"] == sorted(per_block * cfg.n_layers)
    assert saved["full"] == []


@pytest.mark.parametrize("mixer,softmax_every", [("lightning", 0), ("gla", 2)])
def test_scanned_layers_equal_the_unrolled_stack(mixer, softmax_every):
    """scan_layers runs the same blocks: the unrolled model's params, stacked per hybrid
    period, give the same logits (Lightning's per-layer decay follows the traced layer)."""
    cfg, model, params = _model(mixer=mixer, softmax_every=softmax_every, n_layers=4,
                                n_kv_heads=2, remat="full")
    scanned = LinearLlama3(ModelConfig(**{**SMALL, "mixer": mixer, "softmax_every":
                                          softmax_every, "n_layers": 4, "n_kv_heads": 2,
                                          "remat": "full", "scan_layers": True}).validate())
    period = cfg.layer_period
    stacked = {k: v for k, v in params.items() if not k.startswith("layer_")}
    stacked["layers"] = {
        f"block_{j}": jax.tree.map(lambda *xs: jnp.stack(xs),
                                   *(params[f"layer_{p * period + j}"]
                                     for p in range(cfg.n_layers // period)))
        for j in range(period)}
    want_shapes = jax.tree.map(jnp.shape, nn.unbox(scanned.init(
        jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]))
    assert jax.tree.map(jnp.shape, stacked) == want_shapes
    tokens = _tokens(2, 24)
    seg = jnp.asarray(np.repeat([[0] * 10 + [1] * 14], 2, axis=0), jnp.int32)
    want = model.apply({"params": params}, tokens, seg)
    got = scanned.apply({"params": stacked}, tokens, seg)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_scan_layers_needs_whole_periods():
    with pytest.raises(ValueError, match="scan_layers"):
        ModelConfig(**{**SMALL, "n_layers": 3, "softmax_every": 2, "scan_layers": True}).validate()


def test_mlp_chunks_change_memory_not_math():
    """mlp_chunks runs the MLP over interleaved token groups: same params, same logits and
    gradients as the whole-sequence MLP."""
    cfg, model, params = _model(n_layers=2, remat="full")
    chunked = LinearLlama3(ModelConfig(**{**SMALL, "remat": "full", "mlp_chunks": 4}).validate())
    assert jax.tree.map(jnp.shape, nn.unbox(chunked.init(
        jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])) == jax.tree.map(
        jnp.shape, params)
    tokens = _tokens(2, 32)

    def loss(m, p):
        return jnp.mean(m.apply({"params": p}, tokens).astype(jnp.float32) ** 2)

    want, gwant = jax.value_and_grad(functools.partial(loss, model))(params)
    got, ggot = jax.value_and_grad(functools.partial(loss, chunked))(params)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(ggot), jax.tree.leaves(gwant), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6)


def test_softmax_backends_agree_in_a_hybrid():
    """The hybrid's softmax layers on the Pallas flash kernels (interpret mode) give the same
    logits as the blockwise XLA path, with documents."""
    cfg, model, params = _model(mixer="basic", softmax_every=2, n_kv_heads=2)
    pallas_model = LinearLlama3(ModelConfig(**{**SMALL, "mixer": "basic", "softmax_every": 2,
                                               "n_kv_heads": 2, "softmax_backend": "pallas"}))
    tokens = _tokens(2, 24)
    seg = jnp.asarray(np.repeat([[0] * 9 + [1] * 15], 2, axis=0), jnp.int32)
    want = model.apply({"params": params}, tokens, seg)
    got = pallas_model.apply({"params": params}, tokens, seg)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
