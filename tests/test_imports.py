"""Importing attention_ref, listing backends and using NumPy import neither jax nor torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_no_framework_is_imported() -> None:
    code = textwrap.dedent("""
        import sys
        import numpy as np
        import attention_ref as ar
        ar.available_backends()
        ar.known_backends()
        ar.get_backend("numpy")
        x = np.ones((2, 3, 4))
        ar.attention(x, x, x, causal=True)
        ar.attention(x, x, x, backend="np", return_lse=True)
        loaded = sorted(m for m in ("jax", "jaxlib", "torch") if m in sys.modules)
        print(loaded)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
