"""What several property modules share: the seed strategy and ways to change a case's inputs."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st

from ..cases import AttentionCase
from ..strategies import numpy_dtype, random_values

#: Seeds of the NumPy generators that properties draw their own random changes from.
SEEDS = st.integers(0, 2**32 - 1)


def broadcast_full(x: np.ndarray | None, shape: tuple[int, ...], fill: Any, dtype: Any) -> np.ndarray:
    """A writable copy of ``x`` broadcast to ``shape`` (``fill`` everywhere when ``x`` is None)."""
    base = np.full((), fill, dtype=dtype) if x is None else x
    return np.broadcast_to(base, shape).copy()


def with_new_kv(case: AttentionCase, keys: np.ndarray, rng: np.random.Generator) -> AttentionCase:
    """The case with k and v at the key positions ``keys`` (bool, ``(S,)``) replaced by new values."""
    dtype = numpy_dtype(case.dtype)
    k, v = case.k.copy(), case.v.copy()
    k[..., keys, :] = random_values(rng, k[..., keys, :].shape, "normal", 5.0).astype(dtype)
    v[..., keys, :] = random_values(rng, v[..., keys, :].shape, "normal", 5.0).astype(dtype)
    return case.replace(k=k, v=v)
