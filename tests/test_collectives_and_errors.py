"""The communication pattern in compiled HLO, bad-input errors, and the mesh helpers."""

import re

import jax
import jax.numpy as jnp
import pytest
from helpers import mesh, normal, rng

import lasp2_jax
from lasp2_jax.parallel import lasp1_linear_attention

B, T, H, D = 2, 64, 4, 8


def _hlo(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


def _count(op: str, hlo: str) -> int:
    # Count instructions, not operands: "= f32[...] all-gather(" or the async "-start(" form.
    return len(re.findall(rf"= [^=\n]*\b{op}(?:-start)?\(", hlo))


def _inputs(form):
    r = rng()
    q, k, v = (normal(r, (B, T, H, D)) for _ in range(3))
    g = {"none": None, "token": -jnp.abs(normal(r, (B, T, H))),
         "dim": -jnp.abs(normal(r, (B, T, H, D)))}[form]
    return q, k, v, g


@pytest.mark.parametrize("causal,form", [(True, "none"), (True, "token"), (True, "dim"),
                                         (False, "none")])
def test_one_all_gather_forward_one_backward(causal, form):
    q, k, v, g = _inputs(form)
    m = mesh(1, 4, 2)

    def fwd(q, k, v, g):
        return lasp2_jax.linear_attention(q, k, v, log_decay=g, causal=causal, mesh=m)

    def loss(q, k, v, g):
        return jnp.sum(fwd(q, k, v, g) ** 2)

    fwd_hlo = _hlo(fwd, q, k, v, g)
    both_hlo = _hlo(jax.grad(loss, argnums=(0, 1, 2)), q, k, v, g)
    assert _count("all-gather", fwd_hlo) == 1
    assert _count("all-gather", both_hlo) == 2  # the forward's and the backward's
    for op in ("all-reduce", "reduce-scatter", "collective-permute", "all-to-all"):
        assert _count(op, both_hlo) == 0, op


def test_lasp1_uses_sequential_hops():
    q, k, v, g = _inputs("token")
    sp = 4
    hlo = _hlo(lambda *a: lasp1_linear_attention(*a[:3], log_decay=a[3], mesh=mesh(1, sp, 2)),
               q, k, v, g)
    assert _count("collective-permute", hlo) == sp - 1
    assert _count("all-gather", hlo) == 0


def test_lasp2h_gathers_kv_heads_only():
    r = rng()
    q = normal(r, (B, T, H, D))
    k, v = normal(r, (B, T, 1, D)), normal(r, (B, T, 1, D))
    hlo = _hlo(lambda q, k, v: lasp2_jax.softmax_attention(q, k, v, mesh=mesh(1, 4, 1)),
               q, k, v)
    gathers = re.findall(r"= (\w+)\[([\d,]+)\][^\n]*\ball-gather(?:-start)?\(", hlo)
    assert len(gathers) == 2  # K and V
    for _, dims in gathers:
        assert [int(x) for x in dims.split(",")] == [B, T, 1, D]


@pytest.mark.parametrize("case,match", [
    (dict(T=30), r"sequence length T=30 is not divisible by sp=4"),
    (dict(H=3, Hkv=3), r"query heads H=3 is not divisible by tp=2"),
    (dict(H=4, Hkv=3), r"Hkv=3 do not divide query heads H=4"),
    (dict(H=4, Hkv=1), r"kv heads Hkv=1 is not divisible by tp=2"),
    (dict(g_shape=(B, T)), r"log_decay has shape \(2, 64\)"),
    (dict(g_shape=(3,)), r"log_decay has shape \(3,\)"),
    (dict(g_shape=(B, T, H), causal=False), r"log_decay requires causal=True"),
    (dict(B=3), r"batch B=3 is not divisible by dp=2"),
])
def test_bad_input_names_the_sizes(case, match):
    r = rng()
    b, t = case.get("B", B), case.get("T", T)
    h, hkv = case.get("H", H), case.get("Hkv", H)
    q, k, v = normal(r, (b, t, h, D)), normal(r, (b, t, hkv, D)), normal(r, (b, t, hkv, D))
    g = None if "g_shape" not in case else -jnp.ones(case["g_shape"])
    m = mesh(2, 4, 1) if "B" in case else mesh(1, 4, 2)
    with pytest.raises(ValueError, match=match):
        lasp2_jax.linear_attention(q, k, v, log_decay=g, causal=case.get("causal", True),
                                   mesh=m)


def test_bad_initial_state_and_local_view_errors():
    r = rng()
    q = normal(r, (B, T, H, D))
    with pytest.raises(ValueError, match=r"initial_state has shape \(2, 4, 8\)"):
        lasp2_jax.linear_attention(q, q, q, initial_state=jnp.zeros((B, H, D)))
    with pytest.raises(ValueError, match="log_decay requires causal=True"):
        lasp2_jax.linear_attention_local(q, q, q, log_decay=-jnp.ones((H,)), causal=False,
                                         axis_name=None)
    with pytest.raises(ValueError, match="backend='cuda'"):
        lasp2_jax.linear_attention(q, q, q, backend="cuda")


def test_make_mesh_and_rules():
    m = lasp2_jax.make_mesh(dp=2, sp=2, tp=2)
    assert dict(m.shape) == {"dp": 2, "sp": 2, "tp": 2}
    with pytest.raises(ValueError, match=r"dp\*sp\*tp = 1\*3\*2 = 6 does not match the 8"):
        lasp2_jax.make_mesh(sp=3, tp=2)
    spec = lasp2_jax.logical_to_spec(("batch", "sequence", "heads", None))
    assert spec == jax.sharding.PartitionSpec("dp", "sp", "tp", None)
    fsdp = lasp2_jax.logical_to_spec(("embed", "mlp"), lasp2_jax.logical_axis_rules(fsdp=True))
    assert fsdp == jax.sharding.PartitionSpec(("dp", "sp"), "tp")
    with pytest.raises(ValueError, match="unknown logical axes"):
        lasp2_jax.logical_to_spec(("nonsense",))
