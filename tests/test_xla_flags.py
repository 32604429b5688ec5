"""The training step's XLA flags: added to XLA_FLAGS before XLA starts, never over the user's."""

import os
import subprocess
import sys

from lasp2_jax.xla_flags import TRAINING_FLAGS, with_training_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flags(text):
    return dict(word.lstrip("-").split("=", 1) for word in text.split())


def test_flags_are_added_to_other_flags():
    got = _flags(with_training_flags("--xla_force_host_platform_device_count=8"))
    assert got == {"xla_force_host_platform_device_count": "8", **TRAINING_FLAGS}
    assert _flags(with_training_flags("")) == TRAINING_FLAGS


def test_a_flag_the_user_set_is_kept():
    name = next(iter(TRAINING_FLAGS))
    mine = f"--{name}=false --xla_dump_to=/nowhere"
    assert with_training_flags(mine) == mine


def test_applied_before_xla_starts_and_refused_after():
    # A fresh process: XLA must accept the flags (it aborts on a flag it does not know), and
    # once it runs, a second call must say the flags can no longer take effect.
    code = (
        "import os, jax\n"
        "from lasp2_jax.xla_flags import apply_training_flags\n"
        "assert apply_training_flags()\n"
        "print(os.environ['XLA_FLAGS'])\n"
        "print(float(jax.numpy.ones(3).sum()))\n"
        "assert apply_training_flags()  # already there: nothing to do\n"
        "del os.environ['XLA_FLAGS']\n"
        "print(apply_training_flags(), 'XLA_FLAGS' in os.environ)\n")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    flags_line, total, late = out.stdout.split("\n")[:3]
    assert _flags(flags_line) == TRAINING_FLAGS
    assert float(total) == 3.0
    assert late == "False False"
