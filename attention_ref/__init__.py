"""attention_ref: one specification of scaled dot-product attention, three backends (NumPy, JAX,
PyTorch) loaded by name, and the property tests that prove them. See SPEC.md for the rules.

Importing this package imports neither jax nor torch.
"""

from __future__ import annotations

from typing import Any

from .registry import (
    BackendNotAvailableError,
    available_backends,
    backend_for,
    get_backend,
    known_backends,
    register_backend,
)
from .result import AttentionOutput

__all__ = [
    "AttentionOutput",
    "BackendNotAvailableError",
    "attention",
    "available_backends",
    "get_backend",
    "known_backends",
    "register_backend",
]

__version__ = "0.1.0"


def attention(q: Any, k: Any, v: Any, *, backend: Any = None, **kwargs: Any) -> Any:
    """Scaled dot-product attention (SPEC.md) on ``backend``: a name, a backend object, or None to
    use the backend of q's framework. Keyword arguments are those of ``Backend.attention``."""
    if backend is None:
        backend = backend_for(q)
    elif isinstance(backend, str):
        backend = get_backend(backend)
    return backend.attention(q, k, v, **kwargs)
