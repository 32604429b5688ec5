"""ModelConfig: the frozen description of a Linear-Llama3 (pure or hybrid) model."""

from __future__ import annotations

import dataclasses

from lasp2_jax.kernels.backends import BACKENDS

MIXERS = ("basic", "lightning", "retention", "gla", "based", "rebased", "softmax")
FEATURE_MAPS = ("identity", "elu1", "relu", "silu")
REMAT_POLICIES = ("none", "full", "dots", "mixer")
# Mixers without a decay: the only ones that can run bidirectionally (masked LM).
BIDIRECTIONAL_MIXERS = ("basic", "based", "rebased", "softmax")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Linear-Llama3: Llama3 blocks whose attention is a token mixer.

    ``mixer`` is used in every layer except that, with ``softmax_every = k > 0``, layers
    k-1, 2k-1, ... are softmax attention (hybrid ratio 1/k).
    """

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: n_heads (no GQA)
    head_dim: int | None = None  # None: d_model // n_heads
    mlp_dim: int = 512
    mixer: str = "basic"
    softmax_every: int = 0
    causal: bool = True  # False: bidirectional (masked LM); only decay-free mixers
    feature_map: str = "identity"  # basic mixer's feature map on q and k
    normalize: bool = False  # basic mixer: divide by the running key sum (needs a positive map)
    output_norm: bool = True  # RMSNorm per head on linear-mixer outputs
    output_gate: bool = False  # o * silu(W_g x) before the output projection (GLA style)
    gate_rank: int = 16  # GLA: rank of the low-rank decay projection
    gate_normalizer: float = 16.0  # GLA: log decay = logsigmoid(.) / normalizer
    feature_dim: int = 16  # Based / Rebased: per-head q/k width before the feature map
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    dtype: str = "bfloat16"  # compute dtype; params stay in param_dtype
    param_dtype: str = "float32"
    # "none" | "full" | "dots" (save matmul outputs, recompute the rest) | "mixer" (save the
    # mixer's projections, attention output and output projection; recompute the norms and MLP)
    remat: str = "none"
    mlp_chunks: int = 1  # MLP over this many token groups in turn (1/n of its activations)
    scan_layers: bool = False  # one lax.scan over stacked layers: compile time flat in depth
    chunk_size: int = 64  # linear-attention chunk length
    backend: str = "auto"  # linear-attention backend: "xla" | "pallas" | "auto"
    # softmax layers: "xla" (blockwise) | "pallas" (flash kernels) | "auto" (pallas on GPU)
    softmax_backend: str = "auto"

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def dim_head(self) -> int:
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    def layer_mixer(self, layer: int) -> str:
        """The mixer of layer ``layer`` (0-based) under the hybrid pattern."""
        k = self.softmax_every
        return "softmax" if k > 0 and layer % k == k - 1 else self.mixer

    @property
    def layer_period(self) -> int:
        """Layers per repeat of the mixer pattern: softmax_every for a hybrid, else 1."""
        return max(self.softmax_every, 1)

    @property
    def layer_mixers(self) -> tuple[str, ...]:
        return tuple(self.layer_mixer(i) for i in range(self.n_layers))

    def validate(self) -> ModelConfig:
        """Raise ValueError naming the offending ModelConfig setting."""
        def bad(name, why):
            raise ValueError(f"ModelConfig.{name} = {getattr(self, name)!r}: {why}")

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "mlp_dim", "chunk_size",
                     "feature_dim", "gate_rank", "mlp_chunks"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "must be a positive integer")
        if self.mixer not in MIXERS:
            bad("mixer", f"expected one of {MIXERS}")
        if self.feature_map not in FEATURE_MAPS:
            bad("feature_map", f"expected one of {FEATURE_MAPS}")
        if self.remat not in REMAT_POLICIES:
            bad("remat", f"expected one of {REMAT_POLICIES}")
        if self.softmax_every < 0:
            bad("softmax_every", "must be >= 0 (0: no softmax layers)")
        if self.scan_layers and self.n_layers % self.layer_period:
            bad("scan_layers", f"scans whole hybrid periods of {self.layer_period} layers; "
                               f"n_layers={self.n_layers} is not a multiple")
        if self.head_dim is None and self.d_model % self.n_heads:
            bad("n_heads", f"must divide d_model={self.d_model} (or set head_dim)")
        if self.n_heads % self.kv_heads:
            bad("n_kv_heads", f"must divide n_heads={self.n_heads}")
        if self.normalize and self.feature_map == "identity":
            bad("normalize", "needs a positive feature_map (elu1 or relu), not identity")
        if not self.causal:
            bidi = set(self.layer_mixers) - set(BIDIRECTIONAL_MIXERS)
            if bidi:
                bad("causal", f"bidirectional models need decay-free mixers "
                              f"{BIDIRECTIONAL_MIXERS}; got {sorted(bidi)}")
        for name in ("backend", "softmax_backend"):
            if getattr(self, name) not in BACKENDS:
                bad(name, f"expected one of {BACKENDS}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                bad(name, "expected float32, bfloat16 or float16")
        return self
