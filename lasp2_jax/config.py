"""Run configuration: the frozen dataclasses a training run is built from, and the checks
that reject a bad combination before anything is compiled.

``TrainConfig`` holds one section per concern (model, data, mesh, optimizer, checkpoints,
multi-host); gin files bind their fields through the ``train.py`` entry point, Python code
builds them directly.
"""

from __future__ import annotations

import dataclasses
import os

import jax

from lasp2_jax import data as data_lib
from lasp2_jax.mesh import make_mesh
from lasp2_jax.models import ModelConfig

OBJECTIVES = ("causal_lm", "masked_lm")


class ConfigError(ValueError):
    """A setting that cannot work; raised before anything is compiled or written."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes; ``dp = -1`` takes every device that sp and tp leave over."""

    dp: int = -1
    sp: int = 1
    tp: int = 1
    fsdp: bool = False  # also shard the params' 'embed' axis over dp and sp (ZeRO-3 style)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup, cosine decay to ``min_lr_ratio * lr``, global-norm clip."""

    lr: float = 3e-3
    warmup_steps: int = 100
    decay_steps: int | None = None  # None: TrainConfig.steps
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # on matrices only, not on norms and biases
    clip_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100  # steps between saves (the last step and a SIGTERM also save)
    keep: int = 3  # newest checkpoints kept
    async_save: bool = True  # write in the background while training continues
    restore: bool = True  # resume from <workdir>/ckpt when it has a checkpoint


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-host setup for ``jax.distributed.initialize``.

    ``coordinator_address`` set: initialise with these values. Unset: initialise only when
    the environment of a cluster launcher (SLURM, Open MPI, Cloud TPU ...) says so, which
    ``jax.distributed.initialize()`` detects by itself; ``enabled=False`` never initialises.
    """

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    enabled: bool = True


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: data_lib.DataConfig = dataclasses.field(default_factory=data_lib.DataConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    steps: int = 200
    log_every: int = 10
    seed: int = 0
    objective: str = "causal_lm"  # or "masked_lm" (needs ModelConfig.causal = False)
    mask_prob: float = 0.15  # masked LM: fraction of tokens replaced by the mask id
    mask_id: int | None = None  # masked LM: None -> ModelConfig.vocab_size - 1
    ce_chunks: int = 1  # cross-entropy in this many sequence chunks (long sequences)
    eval_every: int = 0  # steps between held-out evaluations (a multiple of log_every); 0: off
    eval_batches: int = 4  # held-out batches per evaluation (needs DataConfig.eval_fraction)
    peak_flops: float | None = None  # per device, for MFU; None: looked up by device kind
    progress: bool = True  # tqdm progress bar on the console


def maybe_init_distributed(cfg: DistributedConfig) -> None:
    """Call ``jax.distributed.initialize`` when configured or launched by a cluster tool."""
    if not cfg.enabled or jax.distributed.is_initialized():
        return
    launched = any(v in os.environ for v in (
        "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS", "TPU_WORKER_ID"))
    if cfg.coordinator_address is None and not launched:
        return
    # CPU devices of different processes talk through gloo; GPUs and TPUs ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=cfg.coordinator_address,
                               num_processes=cfg.num_processes, process_id=cfg.process_id)


def resolve_mesh(cfg: TrainConfig):
    """Build the mesh, filling ``dp = -1`` with the devices left over."""
    m = cfg.mesh
    n = jax.device_count()
    dp = m.dp
    if dp == -1:
        if n % (m.sp * m.tp):
            raise ValueError(f"MeshConfig.sp * MeshConfig.tp = {m.sp} * {m.tp} does not divide "
                             f"the {n} devices available")
        dp = n // (m.sp * m.tp)
    try:
        return make_mesh(dp=dp, sp=m.sp, tp=m.tp)
    except ValueError as e:
        raise ValueError(f"MeshConfig (dp, sp, tp) = ({m.dp}, {m.sp}, {m.tp}): {e}") from None


def validate(cfg: TrainConfig, mesh) -> None:
    """Every check that can fail before compiling; each message names its setting."""
    cfg.model.validate()
    cfg.data.validate()
    mc, dc = cfg.model, cfg.data
    dp, sp, tp = (mesh.shape[a] for a in ("dp", "sp", "tp"))

    def bad(name, why):
        raise ValueError(f"{name}: {why}")

    if cfg.objective not in OBJECTIVES:
        bad(f"TrainConfig.objective = {cfg.objective!r}", f"expected one of {OBJECTIVES}")
    if cfg.objective == "causal_lm" and not mc.causal:
        bad("ModelConfig.causal = False", "the causal_lm objective needs a causal model "
            "(use TrainConfig.objective = 'masked_lm' for bidirectional models)")
    if cfg.objective == "masked_lm":
        if mc.causal:
            bad("ModelConfig.causal = True", "masked_lm needs a bidirectional model")
        if not 0.0 < cfg.mask_prob < 1.0:
            bad(f"TrainConfig.mask_prob = {cfg.mask_prob}", "must be in (0, 1)")
    for name in ("steps", "log_every", "ce_chunks"):
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1:
            bad(f"TrainConfig.{name} = {getattr(cfg, name)!r}", "must be a positive integer")
    if cfg.eval_every:
        if cfg.eval_every % cfg.log_every:
            bad(f"TrainConfig.eval_every = {cfg.eval_every}",
                f"must be a multiple of TrainConfig.log_every = {cfg.log_every}")
        if dc.eval_fraction <= 0.0:
            bad(f"TrainConfig.eval_every = {cfg.eval_every}",
                "needs held-out data: set DataConfig.eval_fraction > 0")
    if cfg.checkpoint.every < 1 or cfg.checkpoint.keep < 1:
        bad("CheckpointConfig.every / keep", "must be positive")
    if dc.seq_len % sp:
        bad(f"DataConfig.seq_len = {dc.seq_len}", f"must be divisible by MeshConfig.sp = {sp}")
    if dc.seq_len % (cfg.ce_chunks * sp):
        bad(f"DataConfig.seq_len = {dc.seq_len}",
            f"must be divisible by TrainConfig.ce_chunks * MeshConfig.sp = {cfg.ce_chunks}*{sp}")
    if dc.batch_size % dp:
        bad(f"DataConfig.batch_size = {dc.batch_size}", f"must be divisible by dp = {dp}")
    if mc.n_heads % tp:
        bad(f"ModelConfig.n_heads = {mc.n_heads}", f"must be divisible by MeshConfig.tp = {tp}")
    if mc.kv_heads % tp:
        bad(f"ModelConfig.n_kv_heads = {mc.kv_heads}",
            f"must be divisible by MeshConfig.tp = {tp}")
    need = data_lib.vocab_size_needed(dc)
    extra = 1 if cfg.objective == "masked_lm" and cfg.mask_id is None else 0
    if need is not None and mc.vocab_size < need + extra:
        bad(f"ModelConfig.vocab_size = {mc.vocab_size}",
            f"the data needs at least {need + extra} ids"
            + (" (its tokens and a mask id)" if extra else ""))
    if cfg.mask_id is not None and not 0 <= cfg.mask_id < mc.vocab_size:
        bad(f"TrainConfig.mask_id = {cfg.mask_id}", "must be a valid token id")
