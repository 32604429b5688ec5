"""Training: train state, the step, and the loop with checkpoints and metrics.

``run(TrainConfig(...), workdir)`` trains a Linear-Llama3 on the data of ``TrainConfig.data``
over a ('dp', 'sp', 'tp') mesh. Everything a run needs to continue exactly (params, optimizer
state, step, data-iterator position) is in its orbax checkpoints under ``<workdir>/ckpt``;
running again with the same workdir resumes from the newest readable one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from lasp2_jax import data as data_lib
from lasp2_jax.checkpoint import Checkpointer
from lasp2_jax.config import (  # noqa: F401 - re-exported: the configs of a run live here too
    OBJECTIVES,
    CheckpointConfig,
    ConfigError,
    DistributedConfig,
    MeshConfig,
    OptimizerConfig,
    TrainConfig,
    maybe_init_distributed,
    resolve_mesh,
    validate,
)
from lasp2_jax.loss import chunked_cross_entropy
from lasp2_jax.mesh import logical_axis_rules, logical_to_spec, make_mesh  # noqa: F401
from lasp2_jax.metrics import (
    MetricsWriter,
    flops_per_token,
    matmul_param_count,
    peak_memory_bytes,
)
from lasp2_jax.metrics import peak_flops_per_device as _device_peak_flops
from lasp2_jax.models import LinearLlama3, ModelConfig, output_matrix
from lasp2_jax.xla_flags import apply_training_flags, with_training_flags

# --------------------------------------------------------------------------- model state


def make_optimizer(cfg: OptimizerConfig, steps: int) -> tuple[optax.GradientTransformation,
                                                             Callable]:
    decay_steps = max(cfg.decay_steps or steps, cfg.warmup_steps + 1)
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
        decay_steps=decay_steps, end_value=cfg.lr * cfg.min_lr_ratio)
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay,
                    mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))
    return tx, schedule


def abstract_params(mcfg: ModelConfig):
    """Boxed param shapes (with logical axis names), without allocating anything."""
    model = LinearLlama3(mcfg)
    tokens = jnp.zeros((1, 8), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))["params"]


def param_shardings(mcfg: ModelConfig, mesh, fsdp: bool = False):
    """NamedShardings of the params from their logical axes and lasp2_jax.mesh's table."""
    rules = logical_axis_rules(fsdp)
    specs = nn.get_partition_spec(abstract_params(mcfg))
    return jax.tree.map(lambda s: NamedSharding(mesh, logical_to_spec(tuple(s), rules)), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def state_shardings(tx, p_shardings, mcfg: ModelConfig, mesh):
    replicated = NamedSharding(mesh, PartitionSpec())
    params = nn.unbox(abstract_params(mcfg))
    opt = jax.eval_shape(tx.init, params)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt, p_shardings,
                                   transform_non_params=lambda _: replicated,
                                   is_leaf=lambda x: isinstance(x, NamedSharding))
    return dict(step=replicated, params=p_shardings, opt_state=opt_sh)


def init_state(cfg: TrainConfig, tx, shardings):
    """Params from the seed, fresh optimizer state, step 0: built already sharded."""
    # init traces one forward pass that is then thrown away; the portable backend keeps GPU
    # kernels out of that compile (the params do not depend on the backend).
    model = LinearLlama3(dataclasses.replace(cfg.model, backend="xla", softmax_backend="xla"))

    def init():
        params = nn.unbox(model.init(jax.random.key(cfg.seed),
                                     jnp.zeros((1, 8), jnp.int32))["params"])
        return dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    return jax.jit(init, out_shardings=shardings)()


# --------------------------------------------------------------------------- loss and step


def apply_mask(batch, step, cfg: TrainConfig):
    """Masked LM: replace a random ``mask_prob`` of tokens by the mask id, score only those.

    The mask comes from (seed, step), so a resumed run masks exactly as an uninterrupted one.
    """
    mask_id = cfg.model.vocab_size - 1 if cfg.mask_id is None else cfg.mask_id
    key = jax.random.fold_in(jax.random.key(cfg.seed + 1), step)
    masked = jax.random.bernoulli(key, cfg.mask_prob, batch["inputs"].shape)
    inputs = jnp.where(masked, mask_id, batch["inputs"])
    return dict(batch, inputs=inputs, weights=masked.astype(jnp.float32))


def _global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                        for x in jax.tree.leaves(tree)))


def make_loss_fn(cfg: TrainConfig, mesh):
    """loss(params, batch) -> (mean token loss, number of scored tokens)."""
    model = LinearLlama3(cfg.model, mesh=mesh)

    def loss_fn(params, batch):
        h = model.apply({"params": params}, batch["inputs"], batch["segment_ids"],
                        method=LinearLlama3.hidden)
        total, count = chunked_cross_entropy(h, output_matrix(params, cfg.model),
                                             batch["targets"], batch["weights"],
                                             cfg.ce_chunks, mesh)
        return total / jnp.maximum(count, 1.0), count

    return loss_fn


def make_train_step(cfg: TrainConfig, tx, schedule, mesh, shardings):
    """Jitted (state, batch) -> (state, metrics); the state's buffers are donated."""
    loss_fn = make_loss_fn(cfg, mesh)

    def train_step(state, batch):
        if cfg.objective == "masked_lm":
            batch = apply_mask(batch, state["step"], cfg)
        (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(loss=loss, grad_norm=_global_norm(grads),
                       lr=schedule(state["step"]), scored_tokens=count)
        return dict(step=state["step"] + 1, params=params, opt_state=opt_state), metrics

    return jax.jit(train_step, out_shardings=(shardings, None), donate_argnums=(0,))


def make_eval_step(cfg: TrainConfig, mesh):
    """Jitted (params, batch, index) -> (loss sum, scored tokens) on held-out data."""
    loss_fn = make_loss_fn(cfg, mesh)

    def eval_step(params, batch, index):
        if cfg.objective == "masked_lm":  # masks of their own, the same at every evaluation
            batch = apply_mask(batch, jnp.int32(_EVAL_MASK_OFFSET) + index, cfg)
        loss, count = loss_fn(params, batch)
        return loss * count, count

    return jax.jit(eval_step)


_EVAL_MASK_OFFSET = 1 << 30


def peak_flops_per_device(cfg: TrainConfig) -> float | None:
    """TrainConfig.peak_flops, else the device's known bf16 peak (None on CPU: no MFU)."""
    return _device_peak_flops(cfg.peak_flops)


# --------------------------------------------------------------------------- the run


@dataclasses.dataclass
class RunResult:
    status: str  # "done" | "preempted" | "nonfinite" | "stopped"
    step: int  # steps completed (the state's step)
    last_checkpoint: int | None
    losses: dict[int, float]  # step -> loss of every step this call ran


class _StopRun(Exception):
    pass


def _global_batch(local: dict, sharding, global_shape, rows):
    lo = rows[0]

    def build(arr):
        def cb(index):
            r = index[0]
            start, stop, _ = r.indices(global_shape[0])
            return arr[start - lo: stop - lo][(slice(None),) + tuple(index[1:])]

        return jax.make_array_from_callback(global_shape, sharding, cb)

    return {k: build(v) for k, v in local.items()}


def run(cfg: TrainConfig, workdir: str, *, callback: Callable[[int, dict], None] | None = None,
        log: Callable[[str], None] | None = None) -> RunResult:
    """Train (or resume) under ``workdir``; see the module docstring.

    ``callback(step, metrics)`` is called after every step with that step's float metrics
    (for notebooks and tests). Returns how the run ended; a non-finite loss ends it with
    status "nonfinite" and no checkpoint written after the last good one.
    """
    flags_applied = apply_training_flags()  # before anything starts XLA
    maybe_init_distributed(cfg.distributed)
    is_main = jax.process_index() == 0
    log = log or (lambda msg: print(f"[lasp2_jax] {msg}", flush=True) if is_main else None)
    if not flags_applied and jax.default_backend() == "gpu":
        log(f"XLA was started before train.run, without XLA_FLAGS=\"{with_training_flags('')}\" "
            "(lasp2_jax.xla_flags): set them before JAX starts for the faster step")
    try:
        mesh = resolve_mesh(cfg)
        validate(cfg, mesh)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    os.makedirs(workdir, exist_ok=True)
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)

    tx, schedule = make_optimizer(cfg.optimizer, cfg.steps)
    p_sh = param_shardings(cfg.model, mesh, cfg.mesh.fsdp)
    shardings = state_shardings(tx, p_sh, cfg.model, mesh)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            jax.eval_shape(lambda: init_state(cfg, tx, shardings)), shardings)

    ckpt = Checkpointer(os.path.join(workdir, "ckpt"), keep=cfg.checkpoint.keep,
                        async_save=cfg.checkpoint.async_save)
    restored = ckpt.restore_latest(abstract, log) if cfg.checkpoint.restore else None
    data_sharding = NamedSharding(mesh, PartitionSpec("dp", "sp"))
    global_shape = (cfg.data.batch_size, cfg.data.seq_len)
    rows = data_lib.process_rows(data_sharding, global_shape)
    shift = cfg.objective == "causal_lm"
    train_stream, eval_stream = data_lib.split_stream(data_lib.load_stream(cfg.data),
                                                      cfg.data.eval_fraction, cfg.data.eos_id)
    batches = data_lib.BatchIterator(cfg.data, rows, shift=shift, stream=train_stream)
    if restored is None:
        state, start, last_ckpt = init_state(cfg, tx, shardings), 0, None
    else:
        start, state, data_state = restored
        batches.set_state(data_state)
        last_ckpt = start
        log(f"resumed from step {start}")
        if start >= cfg.steps:
            log(f"already at step {start} >= TrainConfig.steps = {cfg.steps}: nothing to do "
                "(raise TrainConfig.steps to train on)")
            ckpt.close()
            return RunResult("done", start, start, {})

    n_params = sum(x.size for x in jax.tree.leaves(abstract["params"]))
    fpt = flops_per_token(cfg.model, cfg.data.seq_len,
                          matmul_param_count(abstract["params"], cfg.model))
    peak = peak_flops_per_device(cfg)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    log(f"model: {n_params / 1e6:.2f}M params, layers {list(cfg.model.layer_mixers)}; mesh "
        f"{dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].device_kind} devices, "
        f"{jax.process_count()} process(es); steps {start} -> {cfg.steps}")
    if start == 0 and is_main and cfg.data.source != "tokens":
        log(f"data unigram entropy: {data_lib.unigram_entropy(batches.windows.stream):.3f} "
            f"nats/token (the loss of a context-free model)")

    step_fn = make_train_step(cfg, tx, schedule, mesh, shardings)
    eval_fn = make_eval_step(cfg, mesh) if cfg.eval_every else None

    def evaluate(params) -> float:
        """Mean loss over the same first ``eval_batches`` held-out batches every time."""
        it = data_lib.BatchIterator(dataclasses.replace(cfg.data, num_threads=0), rows,
                                    shift=shift, stream=eval_stream)
        total = count = 0.0
        for i in range(cfg.eval_batches):
            t, c = eval_fn(params, _global_batch(next(it), data_sharding, global_shape, rows),
                           i)
            total, count = total + float(t), count + float(c)
        return total / max(count, 1.0)

    writer = MetricsWriter(workdir, is_main)
    stop = {"signal": False}
    prev_handler = None
    try:
        prev_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(signal=True))
    except ValueError:  # not the main thread: no signal handling
        pass
    bar = None
    if cfg.progress and is_main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="train", dynamic_ncols=True)

    status, losses = "done", {}
    window = []  # losses since the last log line: the logged loss is their mean
    pending = None  # (step, metrics) dispatched but not yet checked: keeps the device busy
    t_last, step_last = time.perf_counter(), start

    def check(p):
        """Fetch a step's metrics; a non-finite loss or gradient stops the run."""
        step_done, m = p
        vals = {k: float(v) for k, v in m.items()}
        losses[step_done] = vals["loss"]
        window.append(vals["loss"])
        if not (math.isfinite(vals["loss"]) and math.isfinite(vals["grad_norm"])):
            raise _StopRun("nonfinite", step_done, vals)
        if callback is not None:
            callback(step_done, vals)
        return vals

    step = start
    try:
        while step < cfg.steps:
            local = next(batches)
            data_state = batches.get_state()
            state, metrics = step_fn(state, _global_batch(local, data_sharding, global_shape,
                                                          rows))
            if pending is not None:
                check(pending)
            step += 1
            pending = (step, metrics)
            if bar is not None:
                bar.update(1)
            if step == start + 1 and step % cfg.log_every and step < cfg.steps:
                # Time from the end of the first step: tokens/s and MFU exclude compilation.
                check(pending)
                pending = None
                t_last, step_last = time.perf_counter(), step
            stop_now = stop["signal"]
            if jax.process_count() > 1:  # every process must agree to stop at the same step
                from jax.experimental import multihost_utils

                stop_now = bool(np.any(multihost_utils.process_allgather(np.array(stop_now))))
            is_last = step == cfg.steps or stop_now
            if step % cfg.log_every == 0 or is_last:
                vals = check(pending)
                pending = None
                now = time.perf_counter()
                tps = tokens_per_step * (step - step_last) / max(now - t_last, 1e-9)
                t_last, step_last = now, step
                mem, mem_kind = peak_memory_bytes()
                row = dict(loss=float(np.mean(window)), grad_norm=vals["grad_norm"],
                           lr=vals["lr"], tokens=step * tokens_per_step, tokens_per_s=tps,
                           step_time_s=tokens_per_step / tps,
                           mfu=(fpt * tps / (peak * jax.device_count())) if peak else None,
                           **{f"peak_{mem_kind}_memory_gb": mem / 1e9})
                window.clear()
                if eval_fn is not None and (step % cfg.eval_every == 0 or is_last):
                    row["eval_loss"] = evaluate(state["params"])
                    t_last = time.perf_counter()  # evaluation time is not training time
                writer.write(step, row)
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{tps:.0f}")
            if step % cfg.checkpoint.every == 0 or is_last:
                if pending is not None:  # never save a state whose update saw a NaN
                    check(pending)
                    pending = None
                ckpt.save(step, state, data_state)
                last_ckpt = step
            if stop_now:
                status = "preempted"
                log(f"SIGTERM: saved step {step}, exiting")
                break
        if pending is not None:
            check(pending)
    except _StopRun as e:
        _, bad_step, vals = e.args
        status = "nonfinite"
        log(f"non-finite loss {vals['loss']} (grad norm {vals['grad_norm']}) at step "
            f"{bad_step}: stopping; last good checkpoint: step {last_ckpt}")
        step = bad_step
    finally:
        ckpt.wait()
        ckpt.close()
        writer.close()
        if bar is not None:
            bar.close()
        if prev_handler is not None:
            signal.signal(signal.SIGTERM, prev_handler)
    return RunResult(status, step, last_ckpt, losses)

