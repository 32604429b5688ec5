"""Plots of the README from the JSON results of one card type (no GPU needed).

    python benchmarks/plot_results.py --card H100

Reads the files named in SP_FILES (benchmarks/results/sp_<card>_<name>.json, bench_sp.py) and
TRAIN_FILES (train_<card>_<name>.json, bench_train.py) and writes sp_<card>_fig3.png (tokens/s
against sequence length per method, like LASP-2's Figure 3) and train_<card>_table6.png
(Linear-Llama3-1B throughput, memory and weak-scaling efficiency, like its Table 6; the newest
code's SP=4 rows, LATEST_FILE, as stars apart from the lines of the earlier runs).
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _rows(pattern):
    """Rows of every matching file; a later file's row replaces an earlier one's for the same
    case (files are read in name order)."""
    rows = {}
    for path in sorted(glob.glob(os.path.join(RESULTS, pattern))):
        with open(path) as f:
            data = json.load(f)
        for r in data["rows"]:
            defaults = dict(remat="full", fsdp=False, xla_flags="", study=None)
            key = tuple(r.get(k, defaults.get(k)) for k in ("method", "model", "remat", "fsdp",
                                                            "sp", "T", "seq_len", "xla_flags"))
            rows[key] = r
    return list(rows.values())


# The layer results drawn, oldest first: a later file's row replaces an earlier one's for the
# same method, SP and length, so each line shows the newest run that measured it.
SP_FILES = ("sp2", "sp2_final", "sp2_state_grad", "sp4", "sp4_splits_256k", "sp4_1m",
            "sp4_final", "sp4_state_grad", "sp4_with_output")


def plot_sp(card):
    rows = [r for name in SP_FILES for r in _rows(f"sp_{card}_{name}.json")]
    # One line per method; the gather-split ablation and the forced forms of LASP-2 are in
    # the README's tables.
    rows = list({(r["method"], r["sp"], r["T"]): r for r in rows
                 if not r["method"].startswith("lasp2_")}.values())
    sps = sorted({r["sp"] for r in rows})
    fig, axes = plt.subplots(1, len(sps), figsize=(6.5 * len(sps), 4.5), squeeze=False)
    for ax, sp in zip(axes[0], sps, strict=True):
        mine = [r for r in rows if r["sp"] == sp]
        for name in sorted({r["method"] for r in mine}):
            pts = sorted({r["T"]: r["tokens_per_s"] for r in mine
                          if r["method"] == name}.items())
            ax.plot(*zip(*pts), marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="sequence length (tokens)",
               ylabel="tokens/s (fwd+bwd, one layer)", title=f"{card} x{sp}, H=16 D=128 bf16")
        ax.legend(fontsize=8)
        if sp == 4:
            ax.text(0.01, 0.01, "softmax: an earlier run, the inputs' copy inside the timing "
                    "(README)", transform=ax.transAxes, fontsize=7, color="gray")
    fig.tight_layout()
    path = os.path.join(RESULTS, f"sp_{card}_fig3.png")
    fig.savefig(path, dpi=110)
    return path


# The training results drawn, oldest first (a later file's row replaces an earlier one's for
# the same case); the weak-scaling panel uses one run only.
TRAIN_FILES = ("output_layer_after", "weak_64k_after", "sp2_2m_after", "1m_after",
               "hybrid_flash", "sp4_table6_state_first", "weak_256k", "sp4_2m_fsdp_state_first")
WEAK_FILE = "weak_256k"
# The newest code's pure SP=4 rows (any remat), drawn apart from the lines of the earlier
# code (which ran without the training XLA flags; rows with flags are left out of those).
LATEST_FILE = "pipelined_allreduce"


def plot_train(card):
    rows = [r for name in TRAIN_FILES for r in _rows(f"train_{card}_{name}.json")
            if not r.get("xla_flags")]
    rows = list({(r["model"], r.get("remat", "full"), bool(r.get("fsdp")), r["sp"],
                  r["seq_len"]): r for r in rows}.values())
    weak = _rows(f"train_{card}_{WEAK_FILE}.json")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for model in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == model and r["sp"] == 4
                and r.get("remat", "full") == "full"]
        pts = sorted((r["seq_len"], r["tokens_per_s_per_gpu"]) for r in mine)
        if pts:
            axes[0].plot(*zip(*pts), marker="o", label=f"{model}, SP=4 (2M: fsdp over sp)")
        # Only rows that recorded their own program's memory: the device's peak counter
        # carries the largest earlier case of the same process.
        pts = sorted((r["seq_len"], r["program_memory_gb"]) for r in mine
                     if r.get("program_memory_gb"))
        if pts:
            axes[1].plot(*zip(*pts), marker="o", label=f"{model}, SP=4")
    newest_rows = [r for r in _rows(f"train_{card}_{LATEST_FILE}.json") if r["model"] == "pure"]
    latest = [r for r in newest_rows if r["sp"] == 4]
    for r in latest:
        for ax, value in ((axes[0], r["tokens_per_s_per_gpu"]), (axes[1], r["program_memory_gb"])):
            ax.plot(r["seq_len"], value, marker="*", ms=11, ls="none", color="black",
                    label=f"pure, SP=4, newest code ({LATEST_FILE})" if r is latest[0] else None)
            ax.annotate(r["remat"], (r["seq_len"], value), textcoords="offset points",
                        xytext=(6, -10), fontsize=7)
    for per_gpu in (65536, 262144):
        pts = sorted((r["sp"], r["tokens_per_s_per_gpu"]) for r in weak
                     if r["model"] == "pure" and r.get("remat", "full") == "full"
                     and not r.get("fsdp") and r["seq_len"] == per_gpu * r["sp"])
        if pts and pts[0][0] == 1:  # efficiency: tokens/s per GPU over SP=1's
            axes[2].plot([sp for sp, _ in pts], [t / pts[0][1] for _, t in pts], marker="o",
                         label=f"{per_gpu // 1024}K tokens per GPU")
    newest = {r["sp"]: r["tokens_per_s_per_gpu"] for r in newest_rows
              if r["remat"] == "full" and r["seq_len"] == 262144 * r["sp"]}
    if 1 in newest and 4 in newest:
        axes[2].plot(4, newest[4] / newest[1], marker="*", ms=11, ls="none", color="black",
                     label=f"256K per GPU, newest code ({LATEST_FILE})")
    axes[2].axhline(0.95, color="gray", lw=0.8, ls="--")  # the goal
    axes[0].set(xscale="log", xlabel="sequence length", ylabel="tokens/s per GPU",
                title=f"Linear-Llama3-1B, {card}")
    axes[1].axhline(80, color="gray", lw=0.8, ls="--")  # the card's memory
    axes[1].set(xscale="log", xlabel="sequence length", ylabel="memory per GPU (GB)",
                ylim=(0, 85))
    axes[2].set(xlabel="SP (GPUs)", ylabel="weak-scaling efficiency", ylim=(0.8, 1.01),
                title=f"weak scaling, pure ({WEAK_FILE})",
                xticks=[1, 2, 4])
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(RESULTS, f"train_{card}_table6.png")
    fig.savefig(path, dpi=110)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--card", default="H100")
    args = ap.parse_args()
    for path in (plot_sp(args.card), plot_train(args.card)):
        print("wrote", path)


if __name__ == "__main__":
    main()
