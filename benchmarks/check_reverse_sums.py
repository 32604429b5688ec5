"""The per-dimension reverse sums kernel at several shapes in one process, against numpy.

    python benchmarks/check_reverse_sums.py 2x384x2 1x4160x4     # B x T x H, in this order

Prints, for each shape, the largest error relative to the largest value and where it is; a
kernel compiled for one shape and reused for another shows up as a large error at the
second shape only.
"""

from __future__ import annotations

import sys

import jax
import numpy as np

from lasp2_jax.kernels import pallas_scans, reference


def main(shapes):
    rng = np.random.default_rng(0)
    print("device", jax.devices()[0].device_kind)
    for spec in shapes:
        B, T, H = (int(x) for x in spec.split("x"))
        dk, chunk = 128, 64
        dbq, dbk = (rng.standard_normal((B, T, H, dk)).astype(np.float32) for _ in range(2))
        final = rng.standard_normal((B, H, dk)).astype(np.float32)
        got = np.asarray(pallas_scans.reverse_decay_sums(dbq, dbk, final, chunk))
        want = reference.reverse_decay_sums_reference(dbq, dbk, final)
        err = np.abs(got - want)
        at = np.unravel_index(np.argmax(err), err.shape)
        bad = np.argwhere(err > 1e-3 * np.abs(want).max())
        chunks = sorted({int(i) // chunk for i in bad[:, 1]}) if len(bad) else []
        print(f"{spec}: max error {err.max() / np.abs(want).max():.2e} of the largest value, "
              f"at {tuple(int(i) for i in at)}; chunks with errors: {chunks[:12]}"
              f"{' ...' if len(chunks) > 12 else ''}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["2x384x2", "1x4160x4"])
