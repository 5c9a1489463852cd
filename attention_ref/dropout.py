"""``dropout_mask``: the one keep-mask every backend and framework can share (SPEC.md rule 13).

Dropout in a reference must be deterministic across frameworks, so attention never draws random
numbers: it takes an explicit boolean keep-mask. This module makes one from a seed, on the host with
NumPy's PCG64 generator, so the same ``(shape, p, seed)`` gives the same mask everywhere.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np


def dropout_mask(shape: tuple[int, ...], p: float, seed: int, *, backend: Any = None) -> Any:
    """A boolean keep-mask of ``shape`` (True = keep), each entry kept with probability ``1 - p``
    independently: ``numpy.random.default_rng(seed).random(shape) >= p``.

    ``shape`` is usually the logits shape ``(..., Hq, L, S)`` or one broadcastable to it. Returns a
    NumPy array, or that backend's array when ``backend`` (a name or a backend object) is given.
    """
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"p must be a real number in [0, 1), got {p!r}")
    if not 0.0 <= float(p) < 1.0:
        raise ValueError(f"p must be in [0, 1), got {p!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int >= 0, got {seed!r}")
    if seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    keep = np.asarray(np.random.default_rng(int(seed)).random(tuple(shape)) >= float(p))
    if backend is None:
        return keep
    if isinstance(backend, str):
        from .registry import get_backend

        backend = get_backend(backend)
    return backend.asarray(keep)
