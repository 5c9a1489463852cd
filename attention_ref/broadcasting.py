"""NumPy broadcasting rules the spec relies on: what may broadcast to the logits shape, and the
reduction of a broadcast value's gradient back to its own shape (rules 5, 6, 13 and 14)."""

from __future__ import annotations

import numpy as np


def is_broadcastable(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether ``shape`` broadcasts (right-aligned, NumPy rules) to ``target`` without changing it."""
    if len(shape) > len(target):
        return False
    return all(n in (1, t) for n, t in zip(reversed(shape), reversed(target), strict=False))


def reduce_to_shape(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum ``x`` over the dims that broadcasting ``shape`` to ``x.shape`` added or stretched (the
    gradient of a broadcast bias, rule 14)."""
    extra = x.ndim - len(shape)
    x = x.sum(axis=tuple(range(extra))) if extra else x
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return x.sum(axis=stretched, keepdims=True) if stretched else x
