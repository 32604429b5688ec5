"""Data: a token stream cut into packed windows, served by grain.

Sources (``DataConfig.source``):
  - "stdlib": the local Python installation's standard-library sources (real text on every
    machine, nothing downloaded), one document per file;
  - "text": text files matching ``DataConfig.path`` (a glob), one document per file;
  - "tokens": a pre-tokenized flat file of uint16 / uint32 ids (raw ``.bin`` or ``.npy``)
    whose documents are separated by ``eos_id``.
Text is tokenized as bytes (ids 0..255; byte 0 separates documents, it never occurs in
source text) or, with ``DataConfig.tokenizer``, by a local ``tokenizer.json``.

Documents are concatenated, each followed by ``eos_id``, and the stream is cut into windows
of ``seq_len`` tokens ("packing": no padding). A window carries ``segment_ids`` (the
document index inside the window) so that attention never crosses a document boundary.

Each process builds only the batch rows its devices hold (:func:`process_rows`), and the
iterator's position is a small JSON dict saved with every checkpoint.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import sys
import sysconfig

import grain
import numpy as np

SOURCES = ("stdlib", "text", "tokens")
BYTE_VOCAB = 256


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "stdlib"
    path: str | None = None  # "text": a glob of files; "tokens": a .bin / .npy token file
    token_dtype: str = "uint16"  # "tokens" .bin files: "uint16" or "uint32"
    tokenizer: str | None = None  # a tokenizer.json for "stdlib" / "text"; None: bytes
    eos_id: int = 0  # document separator id
    seq_len: int = 256
    batch_size: int = 16  # global batch (sequences per step, summed over processes)
    seed: int = 0
    num_threads: int = 2  # grain prefetch threads; 0 reads in the training thread
    prefetch: int = 4  # batches read ahead
    max_documents: int | None = None  # cap on documents read (quick experiments)
    eval_fraction: float = 0.0  # the corpus's last documents held out for evaluation

    def validate(self) -> DataConfig:
        def bad(name, why):
            raise ValueError(f"DataConfig.{name} = {getattr(self, name)!r}: {why}")

        if self.source not in SOURCES:
            bad("source", f"expected one of {SOURCES}")
        if self.source in ("text", "tokens") and not self.path:
            bad("path", f"source={self.source!r} needs a path")
        if self.token_dtype not in ("uint16", "uint32"):
            bad("token_dtype", "expected uint16 or uint32")
        if self.tokenizer is not None and not os.path.exists(self.tokenizer):
            bad("tokenizer", "file not found")
        if not 0.0 <= self.eval_fraction < 1.0:
            bad("eval_fraction", "must be in [0, 1)")
        for name in ("seq_len", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "must be a positive integer")
        return self


def stdlib_files() -> list[str]:
    """The .py files of this Python's standard library (site-packages excluded), sorted."""
    root = sysconfig.get_paths()["stdlib"]
    files = glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
    return sorted(f for f in files if "site-packages" not in f and "dist-packages" not in f)


def _tokenize_files(files, cfg: DataConfig) -> np.ndarray:
    """Files -> one uint32 stream with ``eos_id`` after each document."""
    if cfg.max_documents is not None:
        files = files[: cfg.max_documents]
    if not files:
        raise ValueError(f"DataConfig: no documents found for source={cfg.source!r}, "
                         f"path={cfg.path!r}")
    parts = []
    if cfg.tokenizer is None:
        eos = np.array([cfg.eos_id], np.uint32)
        for f in files:
            with open(f, "rb") as fh:
                parts += [np.frombuffer(fh.read(), np.uint8).astype(np.uint32), eos]
    else:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(cfg.tokenizer)
        texts = []
        for f in files:
            with open(f, encoding="utf-8", errors="replace") as fh:
                texts.append(fh.read())
        for enc in tok.encode_batch(texts, add_special_tokens=False):
            parts += [np.asarray(enc.ids, np.uint32), np.array([cfg.eos_id], np.uint32)]
    return np.concatenate(parts)


def load_stream(cfg: DataConfig) -> np.ndarray:
    """The whole corpus as a 1-D integer array (memory-mapped for token files)."""
    if cfg.source == "stdlib":
        return _tokenize_files(stdlib_files(), cfg)
    if cfg.source == "text":
        return _tokenize_files(sorted(glob.glob(cfg.path, recursive=True)), cfg)
    if not os.path.exists(cfg.path):
        raise ValueError(f"DataConfig.path = {cfg.path!r}: file not found")
    if cfg.path.endswith(".npy"):
        return np.load(cfg.path, mmap_mode="r")
    return np.memmap(cfg.path, dtype=np.dtype(cfg.token_dtype), mode="r")


def split_stream(stream: np.ndarray, eval_fraction: float, eos_id: int):
    """(train, eval) streams: about the last ``eval_fraction`` of the tokens, cut after a
    document's eos so that no document is split between the two. eval is None for 0."""
    if eval_fraction <= 0.0:
        return stream, None
    start = int(len(stream) * (1.0 - eval_fraction))
    ends = np.flatnonzero(np.asarray(stream[start:]) == eos_id)
    if len(ends) == 0 or start + ends[0] + 1 >= len(stream):
        raise ValueError(f"DataConfig.eval_fraction = {eval_fraction}: no complete document "
                         "boundary in the held-out tail; use a larger fraction")
    cut = start + int(ends[0]) + 1
    return stream[:cut], stream[cut:]


def vocab_size_needed(cfg: DataConfig) -> int | None:
    """Smallest model vocabulary the source can need (None: unknown without a full scan)."""
    if cfg.source == "tokens":
        return None
    if cfg.tokenizer is None:
        return BYTE_VOCAB
    from tokenizers import Tokenizer

    return Tokenizer.from_file(cfg.tokenizer).get_vocab_size()


def unigram_entropy(stream: np.ndarray, sample: int = 1 << 22) -> float:
    """Entropy (nats) of the token frequencies: the loss of the best context-free model."""
    counts = np.bincount(np.asarray(stream[:sample], np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


class Windows:
    """Random access to packed windows of a token stream (a grain data source).

    Window i (causal LM): ``inputs`` = stream[iT : iT+T], ``targets`` = the next tokens,
    ``weights`` 0 where the input is an eos (its next token starts another document),
    ``segment_ids`` the document index of each input token within the window.
    With ``shift=False`` (masked LM) targets equal inputs.
    """

    def __init__(self, stream: np.ndarray, seq_len: int, eos_id: int, shift: bool = True):
        self.stream, self.seq_len, self.eos_id, self.shift = stream, seq_len, eos_id, shift
        self.n = (len(stream) - int(shift)) // seq_len
        if self.n < 1:
            raise ValueError(f"DataConfig.seq_len = {seq_len}: longer than the corpus "
                             f"({len(stream)} tokens)")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        T = self.seq_len
        w = np.asarray(self.stream[i * T: (i + 1) * T + int(self.shift)], np.int32)
        inputs, targets = (w[:-1], w[1:]) if self.shift else (w, w)
        is_eos = inputs == self.eos_id
        # A document ends at its eos: the token after it is the first of the next document.
        seg = np.concatenate([[0], np.cumsum(is_eos[:-1])]).astype(np.int32)
        weights = (~is_eos if self.shift else np.ones_like(is_eos)).astype(np.float32)
        return dict(inputs=inputs, targets=targets, segment_ids=seg, weights=weights)


def process_rows(sharding, global_shape) -> tuple[int, int]:
    """The [lo, hi) batch rows that this process's devices hold under ``sharding``."""
    rows = set()
    for idx in sharding.addressable_devices_indices_map(global_shape).values():
        sl = idx[0]
        rows.update(range(*sl.indices(global_shape[0])))
    lo, hi = min(rows), max(rows) + 1
    if len(rows) != hi - lo:
        raise ValueError("this process's batch rows are not contiguous; choose dp, sp, tp so "
                         "that each process holds a contiguous block of the batch")
    return lo, hi


class BatchIterator:
    """Yields dicts of [hi - lo, T] numpy arrays: rows lo..hi-1 of each global batch.

    Global batch k holds windows k*B .. k*B+B-1 of an endlessly repeated, per-epoch
    reshuffled order; the state is grain's ``{"next_index": k}``, equal on every process.
    """

    def __init__(self, cfg: DataConfig, rows: tuple[int, int], shift: bool = True,
                 stream: np.ndarray | None = None):
        self.cfg = cfg
        stream = load_stream(cfg) if stream is None else stream
        self.windows = Windows(stream, cfg.seq_len, cfg.eos_id, shift)
        order = grain.MapDataset.source(self.windows).shuffle(seed=cfg.seed).repeat(None)
        lo, hi = rows
        B = cfg.batch_size

        def batch(k):
            items = [order[k * B + j] for j in range(lo, hi)]
            return {key: np.stack([it[key] for it in items]) for key in items[0]}

        ds = grain.MapDataset.range(0, sys.maxsize).map(batch)
        if cfg.num_threads > 0:
            ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads,
                                                      prefetch_buffer_size=cfg.prefetch))
        self._ds = ds
        self._it = iter(ds)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict:
        return dict(self._it.get_state())

    def set_state(self, state: dict) -> None:
        # A fresh iterator: set_state on a running prefetcher would drop buffered batches.
        self._it = iter(self._ds)
        self._it.set_state(dict(state))
