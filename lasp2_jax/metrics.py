"""Run metrics: FLOPs per token and MFU, peak memory, and the metrics.jsonl / TensorBoard
writer."""

from __future__ import annotations

import json
import os
import resource

import jax

from lasp2_jax.models import ModelConfig

_PEAK_FLOPS = (  # dense bf16 per device, by device_kind substring
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12),
    ("TPU v5p", 459e12), ("TPU v5", 197e12), ("TPU v4", 275e12), ("TPU v6", 918e12),
)


def peak_flops_per_device(override: float | None = None) -> float | None:
    """The device's dense bf16 peak (None when unknown, e.g. on CPU: no MFU then)."""
    if override:
        return override
    kind = jax.devices()[0].device_kind
    return next((f for name, f in _PEAK_FLOPS if name in kind), None)


def mixer_dims(mcfg: ModelConfig, mixer: str) -> tuple[int, int]:
    """(Dk, Dv) of the state a mixer carries per head."""
    Dh = mcfg.dim_head
    if mixer == "based":
        F = mcfg.feature_dim
        return 1 + F + F * (F + 1) // 2, Dh + 1
    if mixer == "rebased":
        return mcfg.feature_dim, Dh + 1
    return Dh, Dh + int(mcfg.normalize and mixer in ("basic", "lightning", "retention"))


def flops_per_token(mcfg: ModelConfig, seq_len: int, n_matmul_params: int) -> float:
    """Training FLOPs per token: 6 N (matmul params) plus the attention (fwd + bwd = 3x fwd).

    Linear layers, per head, per token, forward: the intra-chunk scores and their product
    with v, 2 C (Dk + Dv), plus the state read and update, 4 Dk Dv. Softmax layers: 4 T Dh
    for scores and values, halved when causal.
    """
    attn = 0.0
    for mixer in mcfg.layer_mixers:
        if mixer == "softmax":
            attn += 4 * seq_len * mcfg.dim_head * mcfg.n_heads * (0.5 if mcfg.causal else 1.0)
        else:
            dk, dv = mixer_dims(mcfg, mixer)
            attn += mcfg.n_heads * (2 * mcfg.chunk_size * (dk + dv) + 4 * dk * dv)
    return 6.0 * n_matmul_params + 3.0 * attn


def matmul_param_count(params, mcfg: ModelConfig) -> int:
    """Params that take part in a matmul per token: all but the input embedding (a gather)."""
    total = sum(x.size for x in jax.tree.leaves(params))
    if not mcfg.tie_embeddings:
        total -= params["embed"]["embedding"].size
    return int(total)


def peak_memory_bytes() -> tuple[int, str]:
    """Peak device memory over local devices, or the host's peak RSS where there is none."""
    peaks = [s.get("peak_bytes_in_use", 0) for s in
             (d.memory_stats() for d in jax.local_devices()) if s]
    if peaks:
        return int(max(peaks)), "device"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host"


class MetricsWriter:
    """metrics.jsonl + TensorBoard, on process 0 only."""

    def __init__(self, workdir: str, enabled: bool):
        self.enabled = enabled
        if enabled:
            from tensorboardX import SummaryWriter

            self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(dict(step=step, **metrics)) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and v is not None:
                self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()
