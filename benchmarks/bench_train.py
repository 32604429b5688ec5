"""Training-step benchmark of Linear-Llama3-1B (pure and 1/4 hybrid) under LASP-2.

Like the paper's Table 6: tokens/s, tokens/s per GPU, MFU and memory per GPU (the compiled
step's, from XLA's memory analysis) for one sequence (batch 1) split over SP devices, from 16K
tokens up to the longest that fits; and weak scaling (SP = 1, 2, 4 at a fixed length per
GPU). Random tokens, one document per sequence; the full AdamW step (forward, backward,
update) is timed.

  python benchmarks/bench_train.py --sp 4 --models pure,hybrid
  python benchmarks/bench_train.py --cases pure:1:16384:dots,pure:4:65536:dots
  python benchmarks/bench_train.py --isolate --cases pure:4:2097152:fsdp,pure:4:262144:mixer
  python benchmarks/bench_train.py --quick              # CPU dry run, tiny model

Writes benchmarks/results/train_<card>.json and .png, and prints a table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lasp2_jax.xla_flags import apply_training_flags  # noqa: E402

if "--quick" in sys.argv:
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The training step's XLA flags, as train.run sets them (before JAX starts XLA).
if "--no-training-flags" not in sys.argv:
    apply_training_flags()
# With --isolate the cases run in child processes: this one must not take the device memory
# up front (JAX's default), and the children get the environment as it was.
if "--isolate" in sys.argv:
    _CHILD_ENV = dict(os.environ)
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lasp2_jax import train as T  # noqa: E402
from lasp2_jax.models import ModelConfig  # noqa: E402

LLAMA3_1B = dict(vocab_size=128256, d_model=2048, n_layers=16, n_heads=16, mlp_dim=8192,
                 output_norm=True, dtype="bfloat16", param_dtype="float32", remat="full",
                 chunk_size=64, scan_layers=True)
# The 1/4 hybrid: every 4th layer softmax attention, GQA with 2 query heads per kv head.
VARIANTS = {"pure": dict(mixer="basic"), "hybrid": dict(mixer="basic", softmax_every=4)}
TINY = dict(vocab_size=256, d_model=64, n_layers=4, n_heads=4, mlp_dim=128, remat="full")


# and mlpN: N MLP token groups. "unrolled": the layers one after another in the program, not a
# scan over stacked parameters (no residual slices copied in and out of the stacks).
CASE_OPTIONS = ("none", "full", "dots", "mixer", "fsdp", "unrolled")


@dataclasses.dataclass(frozen=True)
class Case:
    """One measured configuration, written model:sp:tokens[:option...] on the command line."""
    model: str  # a key of VARIANTS
    sp: int
    seq_len: int
    remat: str | None = None  # "none" | "full" | "dots" | "mixer"; None: the base config's (full)
    fsdp: bool = False  # params, gradients and optimizer state sharded over the sp ranks
    mlp_chunks: int | None = None  # MLP token groups; None: --mlp-chunks or one per 64K
    unrolled: bool = False  # scan_layers=False

    @classmethod
    def parse(cls, text: str) -> Case:
        model, sp, seq_len, *options = text.split(":")
        mlp = [o for o in options if re.fullmatch(r"mlp[1-9][0-9]*", o)]
        bad = [o for o in options if o not in CASE_OPTIONS and o not in mlp]
        if model not in VARIANTS or bad or len(mlp) > 1:
            raise SystemExit(f"case {text!r}: model must be one of {sorted(VARIANTS)} and "
                             f"options among {CASE_OPTIONS} or one mlpN")
        remat = next((o for o in options if o in ("none", "full", "dots", "mixer")), None)
        return cls(model, int(sp), int(seq_len), remat, "fsdp" in options,
                   int(mlp[0][3:]) if mlp else None, "unrolled" in options)

    def text(self) -> str:
        """The case as --cases writes it (parse's inverse)."""
        options = [self.remat] if self.remat else []
        options += ["fsdp"] if self.fsdp else []
        options += [f"mlp{self.mlp_chunks}"] if self.mlp_chunks else []
        options += ["unrolled"] if self.unrolled else []
        return ":".join([self.model, str(self.sp), str(self.seq_len), *options])

    def model_config(self, base: dict, mlp_chunks: int | None = None) -> ModelConfig:
        variant = dict(VARIANTS[self.model])
        if self.model == "hybrid":
            variant["n_kv_heads"] = base["n_heads"] // 2
        # Long local sequences: the MLP over token groups of <= 64K (its [T, 8192]
        # intermediates dominate the peak otherwise).
        variant["mlp_chunks"] = (self.mlp_chunks or mlp_chunks
                                 or max(1, self.seq_len // self.sp // 65536))
        if self.remat:
            variant["remat"] = self.remat
        if self.unrolled:
            variant["scan_layers"] = False
        return ModelConfig(**{**base, **variant})


def build(mcfg: ModelConfig, sp: int, seq_len: int, ce_chunks: int, fsdp: bool = False):
    """(cfg, state, step_fn, batch, init seconds) for one sequence of ``seq_len`` random tokens
    on ``sp`` devices. fsdp: parameters, gradients and optimizer state sharded over sp."""
    cfg = T.TrainConfig(model=mcfg, mesh=T.MeshConfig(dp=1, sp=sp, tp=1, fsdp=fsdp), steps=10,
                        ce_chunks=ce_chunks, progress=False)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=seq_len,
                                                            batch_size=1))
    mesh = T.make_mesh(dp=1, sp=sp, tp=1, devices=jax.devices()[:sp])
    T.validate(cfg, mesh)
    tx, schedule = T.make_optimizer(cfg.optimizer, cfg.steps)
    shardings = T.state_shardings(tx, T.param_shardings(mcfg, mesh, fsdp), mcfg, mesh)
    t0 = time.perf_counter()
    state = T.init_state(cfg, tx, shardings)
    jax.block_until_ready(state)
    t_init = time.perf_counter() - t0
    step_fn = T.make_train_step(cfg, tx, schedule, mesh, shardings)
    data_sh = NamedSharding(mesh, PartitionSpec("dp", "sp"))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, mcfg.vocab_size, (1, seq_len + 1), dtype=np.int32)
    batch = dict(inputs=jax.device_put(tokens[:, :-1], data_sh),
                 targets=jax.device_put(tokens[:, 1:], data_sh),
                 weights=jax.device_put(np.ones((1, seq_len), np.float32), data_sh),
                 segment_ids=None)
    return cfg, state, step_fn, batch, t_init


def measure(mcfg: ModelConfig, sp: int, seq_len: int, ce_chunks: int, steps: int,
            fsdp: bool = False):
    """Median step time of one AdamW step on ``sp`` devices; returns a result row."""
    cfg, state, step_fn, batch, t_init = build(mcfg, sp, seq_len, ce_chunks, fsdp)
    t0 = time.perf_counter()
    step_fn = step_fn.lower(state, batch).compile()
    t_compile = time.perf_counter() - t0
    program_gb = _program_bytes(step_fn) / 1e9
    print(f"  init {t_init:.1f} s, compile {t_compile:.1f} s, program {program_gb:.1f} GB per "
          "device", flush=True)
    for _ in range(2):  # warm up
        state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = step_fn(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    dt = float(np.median(times))
    n_mm = T.matmul_param_count(state["params"], mcfg)
    fpt = T.flops_per_token(mcfg, seq_len, n_mm)
    peak = T.peak_flops_per_device(cfg)
    mem, kind = T.peak_memory_bytes()
    tps = seq_len / dt
    return dict(sp=sp, seq_len=seq_len, step_s=dt, tokens_per_s=tps, tokens_per_s_per_gpu=tps / sp,
                mfu=fpt * tps / (peak * sp) if peak else None, peak_memory_gb=mem / 1e9,
                memory_kind=kind, program_memory_gb=program_gb, loss=float(metrics["loss"]),
                init_s=t_init, compile_s=t_compile)


def _memory_gb(row) -> float:
    """A row's memory per device: the compiled program's where recorded (older rows: the
    device's peak counter)."""
    return row.get("program_memory_gb") or row["peak_memory_gb"]


def _program_bytes(compiled) -> int:
    """Device memory the compiled step needs: its arguments, outputs not aliased to donated
    arguments, and temporaries (XLA's own count). Unlike the device's peak counter, which
    keeps the largest value since the process started, this belongs to one case alone."""
    m = compiled.memory_analysis()
    if m is None:
        return 0
    return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sp", type=int, default=None, help="default: all devices")
    ap.add_argument("--models", default="pure,hybrid")
    ap.add_argument("--lengths", default="16384,65536,262144,1048576,2097152")
    ap.add_argument("--weak-per-gpu", type=int, default=16384)
    ap.add_argument("--cases", default=None,
                    help="model:sp:tokens[:none|full|dots|mixer][:fsdp][:mlpN][:unrolled],... "
                         "run just these, in order (else the full sweep); remat policy (default "
                         "full); fsdp shards params and optimizer state over the sp ranks; mlpN "
                         "runs the MLP over N token groups; unrolled: no scan over the layers")
    ap.add_argument("--mlp-chunks", type=int, default=None,
                    help="default: one MLP token group per 64K tokens per device")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=480)
    ap.add_argument("--layers", type=int, default=None, help="override n_layers (diagnostics)")
    ap.add_argument("--softmax-backend", default="auto", help="the hybrid's softmax layers")
    ap.add_argument("--isolate", action="store_true",
                    help="each case in a process of its own: after other cases the device "
                         "memory can be too fragmented for a long case's temporaries")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-training-flags", action="store_true",
                    help="leave out lasp2_jax.xla_flags.TRAINING_FLAGS (XLA_FLAGS as given)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    base = dict(TINY) if args.quick else dict(LLAMA3_1B)
    if args.layers:
        base["n_layers"] = args.layers
    base["softmax_backend"] = args.softmax_backend
    if args.quick:
        args.lengths, args.weak_per_gpu = "256,1024", 128
    W = args.sp or jax.device_count()
    card = jax.devices()[0].device_kind
    os.makedirs(args.out, exist_ok=True)
    print(f"# {card} x{W}, jax {jax.__version__}", flush=True)
    t_start, rows = time.time(), []
    tag = f"train_{card.replace(' ', '_')}_sp{W}" + ("_quick" if args.quick else "")

    def save():  # after every case, so a run cut short keeps what it measured
        with open(os.path.join(args.out, tag + ".json"), "w") as f:
            json.dump(dict(card=card, devices=W, jax=jax.__version__, rows=rows), f, indent=1)

    def run(case: Case, study: str):
        if time.time() - t_start > args.budget_s:
            print(f"budget reached: skip {case}", flush=True)
            return False
        if args.isolate:
            row = _measure_in_child(case, args, W)
            if row is None:
                return False
            row["study"] = study
            rows.append(row)
            save()
            return True
        mcfg = case.model_config(base, args.mlp_chunks)
        try:
            row = measure(mcfg, case.sp, case.seq_len, ce_chunks=max(1, case.seq_len // 16384),
                          steps=args.steps, fsdp=case.fsdp)
        except Exception as e:  # out of memory: the previous length was the longest
            print(f"{case}: failed ({type(e).__name__}: {str(e)[:160]})", flush=True)
            return False
        row.update(model=case.model, study=study, remat=mcfg.remat, mlp_chunks=mcfg.mlp_chunks,
                   fsdp=case.fsdp, scan_layers=mcfg.scan_layers,
                   xla_flags=os.environ.get("XLA_FLAGS", ""))
        rows.append(row)
        save()
        print(json.dumps(row), flush=True)
        return True

    if args.cases:
        for case in map(Case.parse, args.cases.split(",")):
            run(case, "weak" if case.seq_len == args.weak_per_gpu * case.sp else "length")
        models = []
    else:
        models = args.models.split(",")
    for model in models:
        for sp in sorted({1, 2, W} if W >= 2 else {1}):
            run(Case(model, sp, args.weak_per_gpu * sp), "weak")
        for seq_len in [int(x) for x in args.lengths.split(",")]:
            if seq_len % W or not run(Case(model, W, seq_len), "length"):
                break

    _plot(rows, os.path.join(args.out, tag + ".png"), f"{card} x{W}")
    print(f"\n{'model':<8}{'study':<8}{'remat':<6}{'fsdp':<6}{'scan':<6}{'sp':>4}{'tokens':>10}"
          f"{'tok/s':>12}{'tok/s/gpu':>12}{'MFU':>8}{'prog GB':>9}")
    for r in rows:
        mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "-"
        print(f"{r['model']:<8}{r['study']:<8}{r['remat']:<6}{str(r['fsdp']):<6}"
              f"{str(r.get('scan_layers', True)):<6}{r['sp']:>4}"
              f"{r['seq_len']:>10}"
              f"{r['tokens_per_s']:>12.0f}{r['tokens_per_s_per_gpu']:>12.0f}{mfu:>8}"
              f"{_memory_gb(r):>9.2f}")


def _measure_in_child(case: Case, args, world: int) -> dict | None:
    """One case measured by this script in a process of its own; its result row, or None where
    it failed (its output, streamed through, says why)."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, os.path.abspath(__file__), "--cases", case.text(),
               "--sp", str(world), "--steps", str(args.steps), "--out", out,
               "--softmax-backend", args.softmax_backend]
        cmd += ["--layers", str(args.layers)] if args.layers else []
        cmd += ["--mlp-chunks", str(args.mlp_chunks)] if args.mlp_chunks else []
        cmd += ["--quick"] if args.quick else []
        cmd += ["--no-training-flags"] if args.no_training_flags else []
        subprocess.run(cmd, check=False, env=_CHILD_ENV)
        found = [r for path in glob.glob(os.path.join(out, "*.json"))
                 for r in json.load(open(path))["rows"]]
    return found[0] if found else None


def _plot(rows, path, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for model in sorted({r["model"] for r in rows}):
        pts = sorted((r["seq_len"], r["tokens_per_s"], _memory_gb(r)) for r in rows
                     if r["model"] == model and r["study"] == "length")
        if pts:
            x, tps, mem = zip(*pts)
            axes[0].plot(x, tps, marker="o", label=model)
            axes[1].plot(x, mem, marker="o", label=model)
    axes[0].set(xscale="log", xlabel="sequence length", ylabel="tokens/s", title=title)
    axes[1].set(xscale="log", xlabel="sequence length", ylabel="memory per GPU (GB)")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
