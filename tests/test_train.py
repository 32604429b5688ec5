"""Training: sequence parallelism changes nothing, exact resume, SIGTERM, NaN stop, checkpoint
fallback, masked LM, bad configs, and a two-process jax.distributed run."""

import dataclasses
import glob
import json
import os
import signal
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lasp2_jax import metrics as M
from lasp2_jax import train as T
from lasp2_jax.data import DataConfig
from lasp2_jax.models import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(**kw) -> T.TrainConfig:
    """A model small enough to compile and step in seconds on CPU, on real stdlib bytes."""
    model = ModelConfig(**{**dict(vocab_size=256, d_model=32, n_layers=2, n_heads=4,
                                  n_kv_heads=2, mlp_dim=64, dtype="float32", chunk_size=8),
                           **kw.pop("model", {})})
    data = DataConfig(**{**dict(seq_len=64, batch_size=8, max_documents=40, num_threads=0,
                                seed=int(np.random.randint(1000))), **kw.pop("data", {})})
    base = dict(model=model, data=data, mesh=T.MeshConfig(**kw.pop("mesh", {})),
                optimizer=T.OptimizerConfig(**{"lr": 1e-2, "warmup_steps": 2, **kw.pop("opt", {})}),
                checkpoint=T.CheckpointConfig(**{"every": 2, "keep": 3, **kw.pop("ckpt", {})}),
                steps=4, log_every=1, progress=False)
    return T.TrainConfig(**{**base, **kw})


def _quiet(_msg):
    pass


@pytest.fixture(autouse=True, scope="module")
def _compilation_cache(tmp_path_factory):
    """Runs that repeat a program (resume tests) compile it once."""
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    old = {k: getattr(jax.config, k) for k in keys}
    jax.config.update(keys[0], str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update(keys[1], 0.0)
    yield
    for k, v in old.items():
        jax.config.update(k, v)


@pytest.mark.parametrize("mixer,softmax_every,scan", [("gla", 0, False), ("basic", 2, True)],
                         ids=["pure-gla", "hybrid-basic-softmax-scanned-mlp-chunks"])
def test_sequence_parallel_changes_nothing_but_speed(tmp_path, mixer, softmax_every, scan):
    """sp=4, tp=2 on 8 devices trains the same losses as sp=1 (data parallel only)."""
    cfg = _cfg(model=dict(mixer=mixer, softmax_every=softmax_every, scan_layers=scan,
                          mlp_chunks=2 if scan else 1), steps=3)
    sp = T.run(dataclasses.replace(cfg, mesh=T.MeshConfig(dp=1, sp=4, tp=2)),
               str(tmp_path / "sp"), log=_quiet)
    ref = T.run(dataclasses.replace(cfg, mesh=T.MeshConfig(dp=-1, sp=1, tp=1)),
                str(tmp_path / "ref"), log=_quiet)
    assert sp.status == ref.status == "done" and sorted(sp.losses) == [1, 2, 3]
    for step in ref.losses:
        np.testing.assert_allclose(sp.losses[step], ref.losses[step], rtol=2e-5)
    assert ref.losses[3] < ref.losses[1]


def test_kill_sigterm_and_resume_reproduce_the_trajectory(tmp_path):
    """SIGTERM at step 2 (saved there), resume, crash after step 5 (last checkpoint: 4),
    resume to the end: every loss equals the uninterrupted run's, and metrics.jsonl reads
    as one continuous curve (the crash came before step 5 was logged)."""
    cfg = _cfg(steps=6, mesh=dict(dp=4, tp=2))  # tp: the checkpoint holds sharded params
    full = T.run(cfg, str(tmp_path / "full"), log=_quiet).losses
    work = str(tmp_path / "cut")

    def term(step, _):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    def crash(step, _):
        if step == 5:
            raise RuntimeError("simulated crash")

    # SIGTERM: the step in flight completes, is saved, and the run returns cleanly.
    stopped = T.run(cfg, work, callback=term, log=_quiet)
    assert stopped.status == "preempted" and stopped.last_checkpoint == stopped.step < 5
    seen = dict(stopped.losses)
    with pytest.raises(RuntimeError, match="simulated crash"):
        T.run(cfg, work, callback=crash, log=_quiet)
    rest = T.run(cfg, work, log=_quiet)
    assert sorted(rest.losses) == [5, 6]  # resumed from the checkpoint of step 4
    seen.update(rest.losses)
    for step, loss in seen.items():
        np.testing.assert_allclose(loss, full[step], rtol=1e-6)
    logged = [json.loads(x)["step"] for x in open(os.path.join(work, "metrics.jsonl"))]
    assert logged == list(range(1, 7))


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    # lr 1e30 after warmup: weights overflow in the MLP on the following step.
    cfg = _cfg(steps=8, opt=dict(lr=1e30, warmup_steps=1, clip_norm=1e30),
               ckpt=dict(every=1, keep=10))
    messages = []
    res = T.run(cfg, str(tmp_path), log=messages.append)
    assert res.status == "nonfinite" and res.step < 8
    assert any("non-finite" in m for m in messages)
    steps = sorted(int(os.path.basename(p)) for p in glob.glob(str(tmp_path / "ckpt" / "*"))
                   if os.path.basename(p).isdigit())
    assert steps and max(steps) == res.last_checkpoint < res.step


def test_unreadable_latest_checkpoint_falls_back(tmp_path):
    cfg = _cfg(steps=4)
    first = T.run(cfg, str(tmp_path), log=_quiet)
    for path in glob.glob(str(tmp_path / "ckpt" / "4" / "state" / "**"), recursive=True):
        if os.path.isfile(path):
            with open(path, "wb") as f:
                f.write(b"\x00garbage")
    messages = []
    res = T.run(dataclasses.replace(cfg, steps=5), str(tmp_path), log=messages.append)
    assert any("step 4 is unreadable" in m for m in messages)
    assert sorted(res.losses) == [3, 4, 5]
    np.testing.assert_allclose(res.losses[3], first.losses[3], rtol=1e-6)


def test_masked_lm_trains_bidirectional_hybrid(tmp_path):
    cfg = _cfg(model=dict(mixer="based", softmax_every=2, causal=False, vocab_size=264),
               objective="masked_lm", mask_id=256, steps=3, mesh=dict(dp=2, sp=4, tp=1),
               data=dict(eval_fraction=0.2), eval_every=3, eval_batches=2)
    res = T.run(cfg, str(tmp_path), log=_quiet)
    assert res.status == "done" and all(np.isfinite(list(res.losses.values())))
    last = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")][-1]
    assert last["step"] == 3 and np.log(264) > last["eval_loss"] > 0
    # Masked bytes are predicted from context: far better than uniform over 264 ids.
    assert res.losses[3] < np.log(264)


@pytest.mark.parametrize("vocab", [40, 4000], ids=["all-reduce", "gather"])
def test_embedding_gradient_over_sp_ranks(vocab):
    """The embedding's gradient over 4 sp ranks equals the scatter-add of one device, by either
    route: a small table is all-reduced; a table larger than the gathered cotangent is not
    reduced at all (each rank scatters every token), as the compiled program shows."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from lasp2_jax.models.layers import embedding_lookup

    rng = np.random.default_rng()
    B, T_, D = 2, 64, 8
    mesh = T.make_mesh(dp=1, sp=4, tp=1, devices=jax.devices()[:4])
    table = jnp.asarray(rng.normal(size=(vocab, D)), jnp.float32)
    tokens = jax.device_put(rng.integers(0, vocab, (B, T_)).astype(np.int32),
                            NamedSharding(mesh, P(None, "sp")))
    cot = jnp.asarray(rng.normal(size=(B, T_, D)), jnp.float32)

    def loss(table):
        x = jax.lax.with_sharding_constraint(embedding_lookup(table, tokens, jnp.float32, mesh),
                                             NamedSharding(mesh, P(None, "sp")))
        return jnp.sum(x * cot)

    grad = jax.jit(jax.grad(loss))
    want = np.zeros((vocab, D))
    np.add.at(want, np.asarray(tokens), np.asarray(cot))
    np.testing.assert_allclose(grad(table), want, rtol=1e-5, atol=1e-5)
    hlo = grad.lower(table).compile().as_text()
    table_reduced = f"f32[{vocab},{D}]" in "".join(
        line for line in hlo.splitlines() if "all-reduce(" in line)
    assert table_reduced == (vocab == 40)


def test_mfu_flops_count():
    mc = ModelConfig(vocab_size=1000, d_model=64, n_layers=2, n_heads=4, mlp_dim=128)
    params = jax.tree.map(lambda x: x.value, T.abstract_params(mc),
                          is_leaf=lambda x: hasattr(x, "names"))
    n = M.matmul_param_count(params, mc)
    per_layer = 4 * 64 * 64 + 3 * 64 * 128 + 2 * 64 + 16  # attn, mlp, norms, head norm
    assert n == 2 * per_layer + 64 + 64 * 1000
    attn = 4 * (2 * 64 * (16 + 16) + 4 * 16 * 16)
    assert M.flops_per_token(mc, 512, n) == 6 * n + 3 * 2 * attn


@pytest.mark.parametrize("kw,needle", [
    (dict(mesh=dict(dp=3)), "MeshConfig"),
    (dict(mesh=dict(sp=3)), "MeshConfig.sp"),
    (dict(mesh=dict(dp=1, sp=8), data=dict(seq_len=60)), "DataConfig.seq_len"),
    (dict(mesh=dict(dp=2, tp=4), model=dict(n_kv_heads=None, n_heads=2, head_dim=16)),
     "ModelConfig.n_heads"),
    (dict(model=dict(causal=False)), "ModelConfig.causal"),
    (dict(model=dict(vocab_size=100)), "ModelConfig.vocab_size"),
    (dict(data=dict(batch_size=4)), "DataConfig.batch_size"),
    (dict(objective="mlm"), "TrainConfig.objective"),
    (dict(eval_every=2), "DataConfig.eval_fraction"),
])
def test_bad_config_fails_at_start_naming_the_setting(tmp_path, kw, needle):
    with pytest.raises(ValueError, match=needle):
        T.run(_cfg(**kw), str(tmp_path), log=_quiet)
    assert not os.path.exists(tmp_path / "ckpt")  # nothing was started


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_process_distributed_run_trains_and_checkpoints(tmp_path):
    """Two jax.distributed processes (2 CPU devices each, gloo collectives) train one model
    on a dp=2 x sp=2 mesh and write one checkpoint; the losses equal a one-process run."""
    port = _free_port()
    seed = int(np.random.randint(1000))
    common = [
        "ModelConfig.d_model = 32", "ModelConfig.n_layers = 2", "ModelConfig.n_heads = 4",
        "ModelConfig.mlp_dim = 64", "ModelConfig.chunk_size = 8", "ModelConfig.softmax_every = 2",
        "ModelConfig.mixer = 'basic'",
        "DataConfig.seq_len = 64", "DataConfig.batch_size = 4", "DataConfig.max_documents = 40",
        "DataConfig.num_threads = 0", f"DataConfig.seed = {seed}",
        "MeshConfig.dp = 2", "MeshConfig.sp = 2", "OptimizerConfig.lr = 1e-2",
        "OptimizerConfig.warmup_steps = 2",
        "TrainConfig.steps = 3", "TrainConfig.log_every = 1", "TrainConfig.progress = False",
        "CheckpointConfig.every = 3",
        f"DistributedConfig.coordinator_address = 'localhost:{port}'",
        "DistributedConfig.num_processes = 2",
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = []
    for pid in range(2):
        args = [sys.executable, os.path.join(ROOT, "train.py"), "--workdir", str(tmp_path)]
        for b in common + [f"DistributedConfig.process_id = {pid}"]:
            args += ["--gin_param", b]
        procs.append(subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert "2 process(es)" in outs[0]
    assert os.path.isdir(tmp_path / "ckpt" / "3" / "state")
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [x["step"] for x in lines] == [1, 2, 3]

    one = T.run(_cfg(model=dict(softmax_every=2, n_kv_heads=None), steps=3,
                     data=dict(batch_size=4, seed=seed), opt=dict(), mesh=dict(dp=2, sp=4)),
                str(tmp_path / "one"), log=_quiet)
    for x in lines:
        np.testing.assert_allclose(x["loss"], one.losses[x["step"]], rtol=2e-5)


def test_fsdp_shards_embed_axis_over_dp_and_sp():
    mesh = T.resolve_mesh(_cfg(mesh=dict(dp=2, sp=2, tp=2)))
    mc = _cfg().model
    plain = T.param_shardings(mc, mesh, fsdp=False)
    fsdp = T.param_shardings(mc, mesh, fsdp=True)
    assert tuple(plain["embed"]["embedding"].spec) == ("tp", None)
    assert tuple(fsdp["embed"]["embedding"].spec) == ("tp", ("dp", "sp"))
    assert tuple(fsdp["layer_0"]["mlp"]["down"]["kernel"].spec) == ("tp", ("dp", "sp"))


def test_fsdp_over_sequence_parallel_changes_nothing_but_memory(tmp_path):
    """fsdp with dp=1, sp=4: parameters and optimizer state sharded over the sp ranks train
    the same losses as replicated ones."""
    cfg = _cfg(model=dict(scan_layers=True), steps=2)
    run = {fsdp: T.run(dataclasses.replace(cfg, mesh=T.MeshConfig(dp=1, sp=4, tp=2, fsdp=fsdp)),
                       str(tmp_path / str(fsdp)), log=_quiet) for fsdp in (True, False)}
    assert run[True].status == run[False].status == "done"
    for step in run[False].losses:
        np.testing.assert_allclose(run[True].losses[step], run[False].losses[step], rtol=2e-5)
