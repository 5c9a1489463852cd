"""A property's cases depend only on the seed, the settings and the features: not on which local
modules were imported before it ran (Hypothesis' local constants are left out: testing/draws.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

#: Records the shapes and options of the cases ``matches_float64_oracle`` draws for the NumPy backend
#: (seed 0), after importing, or not, a local module full of constants a case could use.
RECORD = textwrap.dedent("""
    import json, sys
    if sys.argv[1] == "with":
        import many_constants  # noqa: F401 (a local module: Hypothesis collects its literals)
    import numpy as np
    import attention_ref as ar
    from attention_ref.testing import get_property, run_property
    from hypothesis import settings

    seen = []

    class Recording:
        name = "recording"
        backend = ar.get_backend("numpy")
        asarray, to_numpy, attention_vjp = backend.asarray, backend.to_numpy, backend.attention_vjp

        def attention(self, q, k, v, **keywords):
            seen.append([q.shape, k.shape, v.shape, sorted((key, repr(value)) for key, value in keywords.items()
                                                             if not isinstance(value, np.ndarray))])
            return self.backend.attention(q, k, v, **keywords)

    run_property(get_property("matches_float64_oracle"), Recording(), settings(max_examples=40, database=None),
                 seed=0)
    print(json.dumps(seen))
""")

#: Integers, floats and strings of the kinds the strategies draw (lengths, head dims, seeds, scales).
CONSTANTS = "\n".join([f"N{i} = {n}" for i, n in enumerate((2, 3, 5, 7, 9, 11, 13, 64, 127, 130, 2**31 - 7,
                                                                3_000_000_019))]
                      + [f"F{i} = {x!r}" for i, x in enumerate((0.37, 1.5, 2.75, 1e-3, 30.0, 0.125))]
                      + ['S = "bottom_right"'])


def test_draws_do_not_depend_on_imported_local_modules(tmp_path: Path) -> None:
    (tmp_path / "many_constants.py").write_text(CONSTANTS + "\n")
    (tmp_path / "record.py").write_text(RECORD)

    def record(mode: str) -> str:
        run = subprocess.run([sys.executable, "record.py", mode], cwd=tmp_path, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stderr
        return run.stdout

    without, with_constants = record("without"), record("with")
    assert without == with_constants
    assert len(without) > 100  # cases were recorded


#: ``check`` of a NumPy kernel defined in a local module, recording the shapes it is called with.
CHECK_RECORD = textwrap.dedent("""
    import json, sys
    kernel_module, other = sys.argv[1], sys.argv[2]
    if other == "with":
        import many_constants  # noqa: F401 (another local module)
    import importlib
    from attention_ref.testing import check
    module = importlib.import_module(kernel_module)
    check(module.attention, framework="numpy", supports=("causal",), max_examples=150, seed=0,
          properties=("matches_float64_oracle",))
    print(json.dumps(module.SEEN))
""")

KERNEL = textwrap.dedent("""
    import attention_ref as ar
    SEEN = []
    {constants}

    def attention(q, k, v, causal=False):
        SEEN.append([q.shape, k.shape, causal, float(q.sum())])
        return ar.attention(q, k, v, backend="numpy", causal=causal)
""")


def test_the_kernels_own_constants_are_drawn_and_no_other_modules(tmp_path: Path) -> None:
    """Hypothesis' local constants are kept for the kernel's own module (its tile sizes are good edge
    values): its literals change the draws, another module's do not."""
    (tmp_path / "many_constants.py").write_text(CONSTANTS + "\n")
    (tmp_path / "record.py").write_text(CHECK_RECORD)
    (tmp_path / "plain_kernel.py").write_text(KERNEL.format(constants=""))
    (tmp_path / "tiled_kernel.py").write_text(KERNEL.format(constants=CONSTANTS))

    def record(kernel: str, other: str) -> str:
        run = subprocess.run([sys.executable, "record.py", kernel, other], cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        return run.stdout

    plain = record("plain_kernel", "without")
    assert record("plain_kernel", "with") == plain
    tiled = record("tiled_kernel", "without")
    assert tiled != plain
    assert record("tiled_kernel", "with") == tiled
