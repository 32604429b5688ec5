"""Registers, spills and shared memory of every Pallas kernel, compiled for an H100 on any
machine (no GPU needed): a CPU-side look at what a kernel change does to register pressure
before spending device time on it.

    pip install triton==3.6.0        # its wheel carries ptxas; no GPU or CUDA install needed
    python benchmarks/kernel_resources.py [--forms basic,lightning,simple_gla,gla]
                                          [--shape 1x16384] [--variant SWITCHES]
                                          [--kernels bwd_dq,bwd_dk]
                                          [--one-loop factorised]

For each decay form, the forward+backward of `pallas.chunk_linear_attention` (bf16, H=16,
D=128) is lowered for the "cuda" platform, each kernel's Triton IR is taken from the lowering
with its launch parameters, compiled by the `triton` package for sm_90a, and its PTX passed to
ptxas -v. Prints a table and writes <out>/<tag>.json.

Caveat: on the GPU, XLA compiles the same IR with the Triton version it bundles, which may
allocate differently; read these numbers as a comparison between kernels and code versions,
not as the GPU's own. (With GLA both branches of the per-dimension path lower: the prescaled
kernels and the exact ones.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import bench_kernels as BK  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax._src.pallas.triton import lowering as triton_lowering  # noqa: E402
from jax.experimental.pallas import triton as _triton  # noqa: E402,F401  (the CUDA lowering)

from lasp2_jax import compat  # noqa: E402
from lasp2_jax.kernels import pallas_forward  # noqa: E402

PTXAS_LINE = re.compile(r"Used (\d+) registers")
SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


@contextlib.contextmanager
def one_loop(kind: str | None):
    """With a decay, pallas_forward.chunk_loop holds two chunk loops in one kernel, picked per
    program (factorised pair weights where a segment allows them, the exact ones elsewhere),
    and ptxas reports the kernel as a whole. kind "factorised" or "exact" keeps that loop
    alone (pallas_forward.ONE_LOOP), to see what one of them needs; None changes nothing."""
    saved = pallas_forward.ONE_LOOP
    pallas_forward.ONE_LOOP = kind
    try:
        yield
    finally:
        pallas_forward.ONE_LOOP = saved


def lowered_kernels(form: str, B: int, T: int, H: int = 16, D: int = 128) -> dict:
    """{kernel name: (Triton IR text, num_warps, num_stages)} of one forward+backward."""
    kernels = {}
    lower = triton_lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = lower(*args, **kwargs)
        text = result.module.operation.get_asm(enable_debug_info=False)
        name = re.search(r"tt\.func public @(\w+)", text).group(1)
        # The launch parameters are locals of the caller (jax's pallas_call lowering rule).
        caller = sys._getframe(1).f_locals
        kernels[name] = (text, caller.get("num_warps"), caller.get("num_stages"))
        return result

    x = jnp.zeros((B, T, H, D), jnp.bfloat16)
    g = BK.make_decay(np.random.default_rng(0), form, B, T, H, D)
    g = None if g is None else jnp.asarray(g)
    fwd_bwd = BK.jax_calls("pallas", x.shape, D ** -0.5)[1]
    interpret = compat.pallas_interpret
    triton_lowering.lower_jaxpr_to_triton_module = capture
    compat.pallas_interpret = lambda: False
    jax.clear_caches()
    try:
        fwd_bwd.trace(x, x, x, g, x).lower(lowering_platforms=("cuda",))
    finally:
        triton_lowering.lower_jaxpr_to_triton_module = lower
        compat.pallas_interpret = interpret
        jax.clear_caches()
    return kernels


def compile_resources(ir_text: str, num_warps: int, num_stages: int, folder: str) -> dict:
    """Shared memory (bytes, from Triton's metadata) and registers and spills (from ptxas -v)
    of one kernel compiled for sm_90a."""
    import triton
    from triton.backends.compiler import GPUTarget

    path = os.path.join(folder, "kernel.ttir")
    with open(path, "w") as f:
        f.write(ir_text)
    compiled = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx = os.path.join(folder, "kernel.ptx")
    with open(ptx, "w") as f:
        f.write(compiled.asm["ptx"])
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    report = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", ptx, "-o",
                             os.path.join(folder, "kernel.cubin")],
                            capture_output=True, text=True, check=True).stderr
    spills = SPILLS.search(report)
    return dict(shared_bytes=compiled.metadata.shared,
                registers=int(PTXAS_LINE.search(report).group(1)),
                spill_store_bytes=int(spills.group(1)), spill_load_bytes=int(spills.group(2)))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--forms", default=",".join(BK.FORMS))
    p.add_argument("--shape", default="1x16384", help="BxT (H=16, D=128)")
    p.add_argument("--variant", default="",
                   help="switches of bench_kernels.SWITCHES, joined by +")
    p.add_argument("--kernels", default="",
                   help="compile only the kernels whose names contain one of these (comma list)")
    p.add_argument("--one-loop", choices=("factorised", "exact"), default=None,
                   help="keep one of a decay's two chunk loops in each kernel (see one_loop)")
    p.add_argument("--tag", default="kernel_resources")
    p.add_argument("--out", default=BK.RESULTS)
    args = p.parse_args()
    if args.variant and not BK.is_switch_variant(args.variant):
        p.error(f"unknown switches {args.variant!r}: {', '.join(BK.SWITCHES)}")
    B, T = (int(x) for x in args.shape.split("x"))
    rows = []
    with BK.switched(args.variant), one_loop(args.one_loop), \
            tempfile.TemporaryDirectory() as folder:
        for form in args.forms.split(","):
            for name, (text, warps, stages) in sorted(lowered_kernels(form, B, T).items()):
                if args.kernels and not any(k in name for k in args.kernels.split(",")):
                    continue
                row = dict(form=form, kernel=name, num_warps=warps, num_stages=stages,
                           **compile_resources(text, warps, stages, folder))
                rows.append(row)
                print(f"{form:10s} {name:34s} warps {warps} stages {stages}  "
                      f"registers {row['registers']:3d}  spills {row['spill_store_bytes']:5d} / "
                      f"{row['spill_load_bytes']:5d} B  shared {row['shared_bytes']:6d} B",
                      flush=True)
    out = dict(target="sm_90a", B=B, T=T, H=16, D=128, variant=args.variant,
               one_loop=args.one_loop, jax=jax.__version__, rows=rows)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.tag}.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
