"""The chunked token cross-entropy and its hand-written backward, against a float64 oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lasp2_jax.loss import chunked_cross_entropy


def _oracle(h, w, targets, weights, round_dlogits=None):
    """float64 loss (weighted mean) and its gradients (dh, dw) written out by hand:
    dlogits = (softmax - onehot) * weight / count, optionally rounded like the kernel's."""
    h, w = np.asarray(h, np.float64), np.asarray(w, np.float64)
    weights = np.asarray(weights, np.float64)
    logits = h @ w
    m = logits.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
    picked = np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]
    count = weights.sum()
    loss = ((lse - picked) * weights).sum() / count
    onehot = np.eye(w.shape[1])[np.asarray(targets)]
    dlogits = (np.exp(logits - lse[..., None]) - onehot) * (weights / count)[..., None]
    if round_dlogits is not None:
        dlogits = round_dlogits(dlogits)
    return loss, dlogits @ w.T, np.einsum("btd,btv->dv", h, dlogits)


def _inputs(dtype, B=2, T=24, D=16, V=40):
    rng = np.random.default_rng()
    h = jnp.asarray(rng.normal(size=(B, T, D)), dtype)
    w = jnp.asarray(rng.normal(size=(D, V)) / np.sqrt(D), jnp.float32)  # master weights
    targets = jnp.asarray(rng.integers(0, V, (B, T)))
    weights = jnp.asarray(rng.random((B, T)) > 0.3, jnp.float32)
    return h, w, targets, weights


def _loss_and_grads(h, w, targets, weights, n_chunks):
    def mean_loss(h, w):
        total, count = chunked_cross_entropy(h, w, targets, weights, n_chunks)
        return total / count

    return jax.value_and_grad(mean_loss, argnums=(0, 1))(h, w)


@pytest.mark.parametrize("n_chunks,logit_scale", [(1, 1.0), (3, 1.0), (3, 100.0)],
                         ids=["1-chunk", "3-chunks", "logits-in-hundreds"])
def test_float32_loss_and_gradients_match_oracle(n_chunks, logit_scale):
    """Logits in the hundreds would overflow exp() unshifted. (Their float32 rounding, about
    1e-5 relative at that scale, moves every probability by as much, hence the tolerance
    relative to the largest entry.)"""
    h, w, targets, weights = _inputs(jnp.float32)
    h = h * logit_scale
    loss, (dh, dw) = _loss_and_grads(h, w, targets, weights, n_chunks)
    want_loss, want_dh, want_dw = _oracle(h, w, targets, weights)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    for got, want in ((dh, want_dh), (dw, want_dw)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert dw.dtype == w.dtype and dh.dtype == h.dtype


def test_bf16_gradients_round_the_logits_cotangent_once():
    """With bf16 activations the backward's one added rounding is the logits' cotangent to
    bf16 (so its matmuls take bf16 operands): gradients match the oracle with that rounding,
    and stay within bf16 error of the unrounded oracle. dw stays float32."""
    h, w, targets, weights = _inputs(jnp.bfloat16, T=48, V=300)
    loss, (dh, dw) = _loss_and_grads(h, w, targets, weights, n_chunks=4)
    # The forward's matmul takes w in bf16 too: the oracle gets the same rounded operands.
    w16 = np.asarray(w.astype(jnp.bfloat16), np.float64)
    want_loss, dh_exact, dw_exact = _oracle(h, w16, targets, weights)
    _, dh_rounded, dw_rounded = _oracle(
        h, w16, targets, weights,
        round_dlogits=lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    assert dw.dtype == jnp.float32 and dh.dtype == jnp.bfloat16
    dh, dw = np.asarray(dh, np.float64), np.asarray(dw, np.float64)

    def rel(got, want):
        return np.linalg.norm(got - want) / np.linalg.norm(want)

    # dw (float32) tells the two apart: a few 1e-6 from the rounded oracle, about 1e-3 from
    # the unrounded one. (Not elementwise: a cotangent entry next to a bf16 rounding boundary
    # may round the other way from its float32 value than from the float64 oracle's.)
    assert rel(dw, dw_rounded) < 1e-4
    # dh is rounded to bf16 itself, 2e-3 from either.
    assert rel(dh, dh_rounded) < 1e-2
    for got, exact in ((dh, dh_exact), (dw, dw_exact)):
        assert rel(got, exact) < 1e-2


def test_chunk_count_must_divide_the_sequence():
    h, w, targets, weights = _inputs(jnp.float32, T=10)
    with pytest.raises(ValueError, match="ce_chunks=3"):
        chunked_cross_entropy(h, w, targets, weights, 3)
