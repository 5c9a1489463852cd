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
from .dropout import dropout_mask
from .result import AttentionOutput, Gradients

__all__ = [
    "AttentionOutput",
    "BackendNotAvailableError",
    "Gradients",
    "attention",
    "attention_vjp",
    "dropout_mask",
    "available_backends",
    "get_backend",
    "known_backends",
    "register_backend",
]

__version__ = "0.1.0"


def attention(q: Any, k: Any, v: Any, *, backend: Any = None, **kwargs: Any) -> Any:
    """Scaled dot-product attention (SPEC.md) on ``backend``: a name, a backend object, or None to
    use the backend of q's framework. Keyword arguments are those of ``Backend.attention``."""
    return _resolve(backend, q).attention(q, k, v, **kwargs)


def _resolve(backend: Any, q: Any) -> Any:
    if backend is None:
        return backend_for(q)
    return get_backend(backend) if isinstance(backend, str) else backend


def attention_vjp(q: Any, k: Any, v: Any, d_out: Any, *, backend: Any = None, **kwargs: Any) -> Gradients:
    """The gradients of attention (SPEC.md rule 14) on ``backend`` (as for ``attention``):
    ``Gradients(dq, dk, dv, dbias)`` of ``sum(attention(q, k, v, **kwargs) * d_out)``."""
    return _resolve(backend, q).attention_vjp(q, k, v, d_out, **kwargs)
