"""Importing attention_ref, listing backends and using NumPy import neither jax nor torch; the
modules depend only downward (nothing below ``attention_ref.testing`` imports it, and the tolerance
rules import neither the testing tools nor the backends)."""

from __future__ import annotations

import ast
import importlib.metadata
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "attention_ref"
#: Modules above the testing tools (the command line runs them); every other one is below them.
ABOVE_TESTING = ("cli.py", "pytest_plugin.py", "testing/")


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


def _imported_modules(path: pathlib.Path) -> set[str]:
    """The absolute names of the attention_ref modules that ``path`` imports (at any depth)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            module = (f"{base}.{node.module}" if node.module else base) if node.level else node.module or ""
            names |= {module, *(f"{module}.{alias.name}" for alias in node.names)}
    return {name for name in names if name.startswith("attention_ref")}


def test_modules_depend_only_downward() -> None:
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        imported = _imported_modules(path)
        if not relative.startswith(ABOVE_TESTING):
            assert not {m for m in imported if m.startswith("attention_ref.testing")}, relative
        if relative.startswith("tolerance/"):
            upward = {m for m in imported if m.startswith(("attention_ref.testing", "attention_ref.backends"))}
            assert not upward, (relative, upward)


def test_testing_exports_the_checker_functions() -> None:
    import attention_ref.testing as testing
    from attention_ref.testing.check import KernelImplementation
    from attention_ref.testing.crosscheck import CrosscheckReport
    from attention_ref.testing.verify import VerifyReport

    assert callable(testing.check) and testing.check.__name__ == "check"
    assert callable(testing.crosscheck) and callable(testing.verify)
    assert testing.CrosscheckReport is CrosscheckReport and testing.VerifyReport is VerifyReport
    assert KernelImplementation.__module__ == "attention_ref.testing.check"
    assert set(testing.__all__) <= set(dir(testing))


def test_testing_without_hypothesis_names_the_extra() -> None:
    code = textwrap.dedent("""
        import sys
        sys.modules["hypothesis"] = None  # as if not installed
        import attention_ref as ar
        ar.get_backend("numpy")
        try:
            from attention_ref.cli import main
            main(["verify"])
        except ImportError as error:
            print(type(error).__name__, error)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("ImportError attention_ref.testing"), result.stdout + result.stderr
    assert "pip install 'attention_ref[verify]'" in result.stdout


def test_public_surface() -> None:
    import dataclasses

    import attention_ref as ar
    from attention_ref.plan import AttentionKeywords

    assert issubclass(ar.get_backend("numpy").__class__, ar.Backend)
    assert set(AttentionKeywords.__annotations__) == {f.name for f in dataclasses.fields(ar.AttentionOptions)}
    with pytest.raises(TypeError, match="causl"):
        ar.attention(*(np.ones((2, 3)),) * 3, causl=True)  # type: ignore[call-overload]
    assert ar.__version__ == importlib.metadata.version("attention_ref")

