"""benchmarks/profile_train.py's trace summary against a brute-force count on random traces."""

import gzip
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import profile_train as PT  # noqa: E402


def _random_intervals(r, n):
    starts = r.integers(0, 200, n)
    return [(int(a), int(a + d)) for a, d in zip(starts, r.integers(1, 30, n))]


def test_exposed_collective_time_matches_brute_force():
    r = np.random.default_rng()
    for _ in range(20):
        comm, compute = _random_intervals(r, 6), _random_intervals(r, 8)
        grid = np.zeros(260, bool), np.zeros(260, bool)
        for (a, b) in comm:
            grid[0][a:b] = True
        for (a, b) in compute:
            grid[1][a:b] = True
        assert PT._exposed(comm, compute) == np.sum(grid[0] & ~grid[1])


def test_summary_counts_device_streams_by_category(tmp_path):
    """Kernels on a GPU stream are summed per category; the 'XLA Ops' line that repeats
    them and host events are left out."""
    ev = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}},
          {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7"}},
          {"ph": "M", "pid": 1, "tid": 8, "name": "thread_name", "args": {"name": "XLA Ops"}}]
    kernels = [("sm90_xmma_gemm_bf16", 0, 40), ("ncclDevKernel_AllReduce", 30, 30),
               ("lasp2_chunk_attention_fwd", 70, 10), ("loop_fusion_3", 80, 5)]
    for name, ts, dur in kernels:
        ev.append({"ph": "X", "pid": 1, "tid": 7, "name": name, "ts": ts, "dur": dur})
        ev.append({"ph": "X", "pid": 1, "tid": 8, "name": name, "ts": ts, "dur": dur})
    ev.append({"ph": "X", "pid": 2, "tid": 1, "name": "gemm_on_host", "ts": 0, "dur": 99})
    path = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": ev}, f)
    s = PT.summarize(str(path), steps=1)
    assert s["devices"] == 1
    assert s["ms_per_step"] == {"collective": 0.030, "linear_attention": 0.010,
                                "matmul": 0.040, "other": 0.005}
    assert abs(s["exposed_collective_ms_per_step"] - 0.020) < 1e-12  # 40..60: no compute
    # The events by time, largest first, cut at `top` (profile_kernels.py lists 50).
    top = PT.summarize(str(path), steps=2, top=2)["top_events_ms_per_step"]
    assert [name for name, _ in top] == ["sm90_xmma_gemm_bf16", "ncclDevKernel_AllReduce"]
    assert np.allclose([ms for _, ms in top], [0.020, 0.015])


def test_collective_bytes_by_kind_and_place():
    """Bytes of random collectives written as compiled HLO, summed by op, dtype and place."""
    r = np.random.default_rng()
    sizes = {"f32": 4, "bf16": 2}
    lines, want = ["%body (p: s32[]) -> s32[] {"], {}
    for place in ("in loop body", "at top level"):
        if place == "at top level":
            lines += ["}", "ENTRY %main (a: f32[2]) -> f32[2] {"]
        for i in range(4):
            op = ["all-reduce", "reduce-scatter", "all-gather"][r.integers(3)]
            dt = ["f32", "bf16"][r.integers(2)]
            dims = r.integers(1, 50, r.integers(1, 4))
            shape = f"{dt}[{','.join(map(str, dims))}]{{0}}"
            if r.random() < 0.5:  # async form: ((operands), results)
                shape = f"(({shape}), {shape})"
            lines.append(f"  %c{i} = {shape} {op}-start(%x), channel_id={i}")
            key = f"{op} {dt} {place}"
            want[key] = want.get(key, 0) + int(np.prod(dims)) * sizes[dt]
    lines.append("}")
    assert PT.collective_bytes("\n".join(lines)) == want
