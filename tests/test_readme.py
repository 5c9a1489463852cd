"""The README's Python examples run as written."""

from __future__ import annotations

import pathlib
import re

from .conftest import import_or_skip

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_examples_run() -> None:
    import_or_skip("jax")
    import_or_skip("torch")
    namespace: dict[str, object] = {}
    assert len(BLOCKS) >= 3
    for block in BLOCKS:
        exec(compile(block, str(README), "exec"), namespace)  # our own README
    assert namespace["out"].shape == (2, 8, 5, 32)
