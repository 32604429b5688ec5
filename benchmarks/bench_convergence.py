"""Short convergence comparison, like the paper's Tables 2 and 4: the same data, steps and
optimizer for pure Linear-Llama3 (basic, Lightning, GLA), the 1/4 hybrid and softmax Llama3
(all-gather attention, LASP-2H), each trained under LASP-2 sequence parallelism.

  python benchmarks/bench_convergence.py --sp 8 --size small --steps 2000   # 8 GPUs
  python benchmarks/bench_convergence.py --quick                             # CPU dry run

Reports the final loss (mean of the last 10% of steps) and tokens/s of each model; writes
benchmarks/results/convergence_<card>.json and a PNG of the loss curves.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

if "--quick" in sys.argv:
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lasp2_jax import train as T  # noqa: E402
from lasp2_jax.data import DataConfig  # noqa: E402
from lasp2_jax.models import ModelConfig  # noqa: E402

MODELS = {
    "basic": dict(mixer="basic"),
    "lightning": dict(mixer="lightning"),
    "gla": dict(mixer="gla", output_gate=True),
    "hybrid_1_4": dict(mixer="basic", softmax_every=4),
    "softmax": dict(mixer="softmax"),
}
SIZES = {  # byte-level models, so the default corpus needs no tokenizer
    "tiny": dict(vocab_size=256, d_model=64, n_layers=4, n_heads=4, mlp_dim=192,
                 dtype="float32"),
    "small": dict(vocab_size=256, d_model=1024, n_layers=8, n_heads=8, mlp_dim=4096,
                  remat="full"),
    "1b": dict(vocab_size=256, d_model=2048, n_layers=16, n_heads=16, mlp_dim=8192,
               remat="full"),
}


def train_one(name, size, args):
    mcfg = ModelConfig(**SIZES[size], **MODELS[name])
    data = DataConfig(seq_len=args.seq_len, batch_size=args.batch_size)
    cfg = T.TrainConfig(model=mcfg, data=data, mesh=T.MeshConfig(dp=-1, sp=args.sp),
                        optimizer=T.OptimizerConfig(lr=args.lr, warmup_steps=args.steps // 10),
                        checkpoint=T.CheckpointConfig(every=10**9, restore=False),
                        steps=args.steps, log_every=max(1, args.steps // 20), progress=False)
    losses = {}
    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.time()
        T.run(cfg, workdir, callback=lambda step, m: losses.__setitem__(step, m["loss"]))
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            metrics = [json.loads(line) for line in f]
    tps = [m["tokens_per_s"] for m in metrics[1:]] or [metrics[-1]["tokens_per_s"]]
    steps = sorted(losses)
    tail = [losses[s] for s in steps[-max(1, len(steps) // 10):]]
    return dict(model=name, size=size, steps=args.steps, final_loss=float(np.mean(tail)),
                tokens_per_s=float(np.median(tps)), wall_s=time.time() - t0,
                loss_curve=[losses[s] for s in steps])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--size", default="small", choices=sorted(SIZES))
    ap.add_argument("--sp", type=int, default=None, help="default: all devices")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seq-len", type=int, default=16384)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    if args.quick:
        args.size, args.steps, args.seq_len, args.batch_size = "tiny", 30, 256, 4
        args.lr = 3e-3
    args.sp = args.sp or jax.device_count()
    card = jax.devices()[0].device_kind
    print(f"# {card} x{jax.device_count()}, sp={args.sp}, jax {jax.__version__}, "
          f"size {args.size}, {args.steps} steps of {args.batch_size} x {args.seq_len}",
          flush=True)
    rows = []
    for name in args.models.split(","):
        rows.append(train_one(name, args.size, args))
        r = rows[-1]
        print(f"{name}: final loss {r['final_loss']:.4f}, {r['tokens_per_s']:.0f} tok/s",
              flush=True)
    os.makedirs(args.out, exist_ok=True)
    tag = f"convergence_{card.replace(' ', '_')}_sp{args.sp}" + ("_quick" if args.quick else "")
    with open(os.path.join(args.out, tag + ".json"), "w") as f:
        json.dump(dict(card=card, devices=jax.device_count(), jax=jax.__version__,
                       args=vars(args), rows=rows), f, indent=1)
    _plot(rows, os.path.join(args.out, tag + ".png"))
    print(f"\n{'model':<12}{'final loss':>12}{'tokens/s':>12}")
    for r in rows:
        print(f"{r['model']:<12}{r['final_loss']:>12.4f}{r['tokens_per_s']:>12.0f}")


def _plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.plot(range(1, len(r["loss_curve"]) + 1), r["loss_curve"], label=r["model"])
    ax.set(xlabel="step", ylabel="training loss (nats/byte)", yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
