"""Where one Linear-Llama3-1B training step spends its device time: a profiler trace of a few
steps, summed by category (matmuls, linear-attention kernels, softmax kernels, collectives,
other), with the collective time that no compute on the same device overlaps ("exposed").

    python benchmarks/profile_train.py --case pure:4:65536          # on a 4-GPU machine
    python benchmarks/profile_train.py --quick                      # CPU dry run, tiny model

Writes <out>/profile_<case>.json (the summary) and the raw trace under <out>/trace/, and
prints the table last. Categories come from event names (XLA op and kernel names), so they
are approximate where a fusion mixes work.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import re
import sys
import time

if "--quick" in sys.argv:
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CATEGORIES = (  # first match wins
    ("collective", r"all[-_]?reduce|all[-_]?gather|reduce[-_]?scatter|collective[-_]?permute"
                   r"|nccl|ppermute|rendezvous"),
    ("linear_attention", r"lasp2_"),
    ("softmax_attention", r"lasp2h_flash"),
    ("matmul", r"gemm|cublas|cutlass|nvjet|matmul|\bdot\b|dot_general|sm90_xmma|wgmma"),
)
_HOST_OVERHEAD = re.compile(r"^\$|PjitFunction|Execute|ThunkExecutor|profiler")


def category(name: str) -> str:
    for cat, pattern in CATEGORIES:
        if re.search(pattern, name, re.IGNORECASE):
            return cat
    return "other"


def _union_length(intervals):
    total, end = 0.0, -float("inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _exposed(comm, compute):
    """Length of the comm intervals not covered by any compute interval."""
    both = _union_length(comm + compute)
    return both - _union_length(compute)


def summarize(trace_path: str, steps: int, top: int = 20):
    """Per-step device milliseconds by category, exposed collective time and the `top`
    events by time."""
    with gzip.open(trace_path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {p for p, n in names.items() if re.search(r"gpu|device", n, re.IGNORECASE)}
    pids = device_pids or set(names)  # CPU dry run: the host threads stand in for devices
    # On a GPU each device also has "XLA Ops" / "XLA Modules" lines that repeat the kernels
    # of its streams: count the stream lines only, where there are any.
    streams = {(e["pid"], e["tid"]) for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"
               and e.get("pid") in pids and "stream" in e["args"]["name"].lower()}
    by_cat, by_name, per_device, launched_by = {}, {}, {}, {}
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in pids or _HOST_OVERHEAD.search(e["name"]):
            continue
        if streams and (e["pid"], e.get("tid")) not in streams:
            continue
        cat = category(e["name"])
        dur = e.get("dur", 0.0)
        by_cat[cat] = by_cat.get(cat, 0.0) + dur
        by_name[e["name"]] = by_name.get(e["name"], 0.0) + dur
        # A library kernel (cuBLAS, a memcpy) does not name its HLO op; the event's args do.
        op = (e.get("args") or {}).get("hlo_op")
        if op:
            ops = launched_by.setdefault(e["name"], {})
            ops[op] = ops.get(op, 0.0) + dur
        span = (e["ts"], e["ts"] + dur)
        dev = per_device.setdefault(e["pid"], {"comm": [], "compute": []})
        dev["comm" if cat == "collective" else "compute"].append(span)
    n_dev = max(len(per_device), 1)
    exposed = sum(_exposed(d["comm"], d["compute"]) for d in per_device.values())
    scale = 1e-3 / (steps * n_dev)  # us summed over devices and steps -> ms per device-step
    top_names = sorted(by_name, key=lambda n: -by_name[n])[:top]
    return dict(
        devices=n_dev,
        ms_per_step=({c: t * scale for c, t in sorted(by_cat.items())}),
        exposed_collective_ms_per_step=exposed * scale,
        top_events_ms_per_step=[(n, by_name[n] * scale) for n in top_names],
        # For each listed event, the HLO ops that launched it, by time (at most 5).
        top_events_hlo_ops={n: [(op, t * scale) for op, t in sorted(
            launched_by[n].items(), key=lambda x: -x[1])[:5]]
            for n in top_names if n in launched_by},
    )


_COLLECTIVE_OP = re.compile(r"=\s*(.*?)\s(all-reduce|all-gather|reduce-scatter)(?:-start)?\(")
_ARRAY = re.compile(r"\b(pred|[fsu]\d+|bf16)\[([\d,]*)\]")


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes each collective kind moves per execution of its computation, from compiled HLO
    text, keyed "<op> <dtypes> <in loop body|at top level>". Ops inside a while body run once
    per layer (scanned layers): the key says so instead of multiplying by the trip count."""
    totals, in_entry = {}, False
    for line in hlo_text.splitlines():
        if line and not line.startswith(" "):  # a computation's header
            in_entry = line.startswith("ENTRY")
        m = _COLLECTIVE_OP.search(line)
        if not m:
            continue
        shapes = _ARRAY.findall(m.group(1))
        if m.group(1).startswith("(("):
            shapes = shapes[len(shapes) // 2:]  # async start: (operands, results)
        size = sum(int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
                   * _DTYPE_BYTES.get(dt, 4) for dt, dims in shapes)
        dtypes = "+".join(sorted({dt for dt, _ in shapes}))
        key = f"{m.group(2)} {dtypes} {'at top level' if in_entry else 'in loop body'}"
        totals[key] = totals.get(key, 0) + size
    return totals


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def describe_fusions(hlo_text: str, names) -> dict[str, str]:
    """For each event name that is an instruction of the compiled HLO (XLA names a fusion's
    kernel after it): "<result shape> <op kinds inside> [<the jax op it came from>]", e.g.
    "bf16[1,65536,8192] fusion: multiply [.../mlp/mul]". Names the HLO does not hold (library
    kernels such as cuBLAS's) are left out.
    """
    bodies, current = {}, None
    instructions = {}
    for line in hlo_text.splitlines():
        if line and not line.startswith(" "):  # a computation's header: "%name (...) -> ..."
            current = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            bodies[current] = set()
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, shape, op = m.groups()
        if current is not None:
            bodies[current].add(op)
        calls, source = _CALLS.search(line), _OP_NAME.search(line)
        # Kernels are named after the instruction with "_" for ".": loop_multiply_fusion_7.
        instructions[name.replace(".", "_")] = (
            shape.split("{")[0], op, calls.group(1) if calls else None,
            source.group(1).split("/", 1)[-1] if source else "")
    out = {}
    for name in names:
        key = name.replace(".", "_")  # an event's hlo_op arg keeps the dots
        if key not in instructions:
            continue
        shape, op, called, source = instructions[key]
        inner = sorted(bodies.get(called, ()) - {"parameter"}) if called else []
        out[name] = (f"{shape} {op}" + (": " + ", ".join(inner) if inner else "")
                     + (f" [{source}]" if source else ""))
    return out


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "f32": 4, "s32": 4,
                "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="pure:4:65536",
                    help="model:sp:tokens[:option...], as in bench_train --cases")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--top", type=int, default=20, help="how many events to list by time")
    ap.add_argument("--save-hlo", action="store_true",
                    help="also write the compiled step's HLO text (<out>/<tag>.hlo.txt), to "
                         "look up what the listed fusions compute")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    # Imported here: the trace summary above serves profile_kernels.py too, which must not
    # need the training stack (its data pipeline) on a kernels-only machine.
    import bench_train as BT

    base = dict(BT.TINY) if args.quick else dict(BT.LLAMA3_1B)
    if args.quick:
        args.case = "hybrid:4:1024"
    case = BT.Case.parse(args.case)
    mcfg = case.model_config(base)
    _, state, step_fn, batch, _ = BT.build(mcfg, case.sp, case.seq_len,
                                           max(1, case.seq_len // 16384), case.fsdp)
    hlo = step_fn.lower(state, batch).compile().as_text()
    collectives = collective_bytes(hlo)
    for _ in range(2):  # compile and warm up
        state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    tag = "profile_" + args.case.replace(":", "_") + ("_quick" if args.quick else "")
    trace_dir = os.path.join(args.out, "trace")
    t0 = time.perf_counter()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(args.steps):
            state, metrics = step_fn(state, batch)
        jax.block_until_ready(metrics)
    wall = (time.perf_counter() - t0) / args.steps
    trace = max(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                          recursive=True), key=os.path.getmtime)
    summary = dict(case=args.case, card=jax.devices()[0].device_kind, jax=jax.__version__,
                   step_wall_ms=wall * 1e3, collective_bytes=collectives,
                   collective_ops=[line.strip()[:300] for line in hlo.splitlines()
                                   if _COLLECTIVE_OP.search(line)],
                   **summarize(trace, args.steps, args.top))
    launchers = {op for ops in summary["top_events_hlo_ops"].values() for op, _ in ops}
    summary["top_fusions"] = describe_fusions(
        hlo, [n for n, _ in summary["top_events_ms_per_step"]] + sorted(launchers))
    with open(os.path.join(args.out, tag + ".json"), "w") as f:
        json.dump(summary, f, indent=1)
    if args.save_hlo:
        with open(os.path.join(args.out, tag + ".hlo.txt"), "w") as f:
            f.write(hlo)
    print(f"\n{summary['card']} x{case.sp}, {args.case}: step {summary['step_wall_ms']:.1f} ms "
          f"(wall, with the profiler)")
    for cat, ms in summary["ms_per_step"].items():
        print(f"  {cat:<18} {ms:10.2f} ms per device and step")
    print(f"  {'exposed collective':<18} {summary['exposed_collective_ms_per_step']:10.2f} ms")
    print("collectives in the compiled step (MB per execution):")
    for key, size in sorted(collectives.items()):
        print(f"  {size / 1e6:10.1f}  {key}")
    print("top events (ms per device and step):")
    for name, ms in summary["top_events_ms_per_step"][:args.top]:
        launchers = summary["top_events_hlo_ops"].get(name, [])
        what = summary["top_fusions"].get(name) or ", ".join(
            f"{op} {summary['top_fusions'].get(op, '')}"
            for op, _ in launchers[:2])
        print(f"  {ms:10.2f}  {name[:40]:<40} {what[:120]}")


if __name__ == "__main__":
    main()
