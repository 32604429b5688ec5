"""The README's usage example runs as written (at a shorter length) and gives the shapes its
comments state."""

from __future__ import annotations

import os
import re

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _usage_example() -> str:
    """The first Python block of the README's "Use" section."""
    with open(README) as f:
        text = f.read()
    use = text[text.index("\n## Use\n"):]
    return re.search(r"```python\n(.*?)```", use, re.S).group(1)


def test_readme_usage_example_runs():
    code = _usage_example()
    assert "B, T, H, D = 1, 65536, 16, 128" in code  # the line shortened below
    scope: dict = {}
    exec(code.replace("B, T, H, D = 1, 65536, 16, 128", "B, T, H, D = 1, 256, 16, 128"), scope)
    B, T, H, D = scope["B"], scope["T"], scope["H"], scope["D"]
    assert scope["o"].shape == (B, T, H, D)
    assert scope["state"].shape == (B, H, D, D)
    assert scope["y"].shape == (B, T, H, D)
