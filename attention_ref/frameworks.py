"""Recognise arrays of each framework without importing any framework.

An array's framework is read from the module of its type (``numpy``, ``jax``/``jaxlib``, ``torch``),
so asking "which framework is this?" never imports jax or torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Framework names, in the order used in messages and tables.
FRAMEWORKS = ("numpy", "jax", "torch")

_TOP_LEVEL_MODULE_TO_FRAMEWORK = {
    "numpy": "numpy",
    "jax": "jax",
    "jaxlib": "jax",
    "torch": "torch",
}


def framework_of(x: Any) -> str | None:
    """Return ``"numpy"``, ``"jax"`` or ``"torch"`` for an array of that framework, else None.

    NumPy scalars and Python numbers are not arrays: they return None.
    """
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        return None
    for cls in type(x).__mro__:
        framework = _TOP_LEVEL_MODULE_TO_FRAMEWORK.get(cls.__module__.split(".")[0])
        if framework is not None:
            if framework == "numpy" and not isinstance(x, np.ndarray):
                return None
            return framework
    return None


def dtype_name(x: Any) -> str:
    """The dtype of an array as a framework-neutral name: ``"float32"``, ``"bfloat16"``, ``"bool"``..."""
    return str(x.dtype).removeprefix("torch.")


def shape_of(x: Any) -> tuple[int, ...]:
    """The shape of an array as a plain tuple of ints (``torch.Size`` and jax shapes included)."""
    return tuple(int(n) for n in x.shape)


def device_of(x: Any) -> str | None:
    """Where an array lives, as text (``"cpu"``, ``"cuda:0"``...); None when unknown (a jax tracer)."""
    framework = framework_of(x)
    if framework == "numpy":
        return "cpu"
    if framework == "torch":
        return str(x.device)
    try:
        devices = x.devices()
    except Exception:  # tracers under jax transformations have no devices
        return None
    return ",".join(sorted(str(d) for d in devices))


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a floating dtype name (bfloat16 through ml_dtypes, imported on demand)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)
