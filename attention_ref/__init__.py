"""attention_ref: one specification of scaled dot-product attention, three backends (NumPy, JAX,
PyTorch) loaded by name, and the property tests that prove them. See SPEC.md for the rules.

Importing this package imports neither jax nor torch.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar, Unpack, overload

from .backends.base import Backend
from .dropout import dropout_mask
from .plan import AttentionKeywords, AttentionOptions
from .registry import (
    BackendNotAvailableError,
    available_backends,
    backend_for,
    get_backend,
    known_backends,
    register_backend,
)
from .result import AttentionOutput, Gradients

__all__ = [
    "AttentionOptions",
    "AttentionOutput",
    "Backend",
    "BackendNotAvailableError",
    "Gradients",
    "__version__",
    "attention",
    "attention_vjp",
    "available_backends",
    "dropout_mask",
    "get_backend",
    "known_backends",
    "register_backend",
]

#: The package version (pyproject.toml reads it from here).
__version__ = "0.1.0"

ArrayT = TypeVar("ArrayT")


@overload
def attention(q: ArrayT, k: ArrayT, v: ArrayT, *, backend: str | Backend | None = ...,
              return_weights: Literal[False] = ..., return_lse: Literal[False] = ..., compute_dtype: Any = ...,
              **options: Unpack[AttentionKeywords]) -> ArrayT: ...
@overload
def attention(q: ArrayT, k: ArrayT, v: ArrayT, *, backend: str | Backend | None = ..., return_weights: Literal[True],
              return_lse: bool = ..., compute_dtype: Any = ...,
              **options: Unpack[AttentionKeywords]) -> AttentionOutput: ...
@overload
def attention(q: ArrayT, k: ArrayT, v: ArrayT, *, backend: str | Backend | None = ..., return_weights: bool = ...,
              return_lse: Literal[True], compute_dtype: Any = ...,
              **options: Unpack[AttentionKeywords]) -> AttentionOutput: ...
@overload
def attention(q: ArrayT, k: ArrayT, v: ArrayT, *, backend: str | Backend | None = ..., return_weights: bool = ...,
              return_lse: bool = ..., compute_dtype: Any = ...,
              **options: Unpack[AttentionKeywords]) -> ArrayT | AttentionOutput: ...


def attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    backend: str | Backend | None = None,
    mask: Any = None,
    bias: Any = None,
    scale: float | None = None,
    causal: bool = False,
    alignment: str = "top_left",
    softcap: float | None = None,
    window: tuple[int | None, int | None] | None = None,
    dropout_p: float = 0.0,
    dropout_mask: Any = None,
    return_weights: bool = False,
    return_lse: bool = False,
    compute_dtype: Any = None,
) -> Any:
    """Scaled dot-product attention (SPEC.md) on ``backend``: a name, a backend object, or None to
    use the backend of q's framework. The other arguments are those of ``Backend.attention``:
    q ``(*B, Hq, L, E)``, k ``(*B, Hkv, S, E)``, v ``(*B, Hkv, S, Ev)``; returns out ``(*B, Hq, L, Ev)``,
    or ``AttentionOutput(out, weights, lse)`` with a return flag."""
    options = AttentionOptions(mask=mask, bias=bias, scale=scale, causal=causal, alignment=alignment,
                               softcap=softcap, window=window, dropout_p=dropout_p, dropout_mask=dropout_mask)
    return _resolve(backend, q).attention_with(q, k, v, options, return_weights=return_weights,
                                               return_lse=return_lse, compute_dtype=compute_dtype)


def attention_vjp(
    q: ArrayT,
    k: ArrayT,
    v: ArrayT,
    d_out: ArrayT,
    *,
    backend: str | Backend | None = None,
    mask: Any = None,
    bias: Any = None,
    scale: float | None = None,
    causal: bool = False,
    alignment: str = "top_left",
    softcap: float | None = None,
    window: tuple[int | None, int | None] | None = None,
    dropout_p: float = 0.0,
    dropout_mask: Any = None,
    compute_dtype: Any = None,
) -> Gradients:
    """The gradients of attention (SPEC.md rule 14) on ``backend`` (as for ``attention``):
    ``Gradients(dq, dk, dv, dbias)`` of ``sum(attention(q, k, v, **keywords) * d_out)``."""
    options = AttentionOptions(mask=mask, bias=bias, scale=scale, causal=causal, alignment=alignment,
                               softcap=softcap, window=window, dropout_p=dropout_p, dropout_mask=dropout_mask)
    return _resolve(backend, q).attention_vjp_with(q, k, v, d_out, options, compute_dtype=compute_dtype)


def _resolve(backend: str | Backend | None, q: Any) -> Backend:
    if backend is None:
        return backend_for(q)
    if isinstance(backend, str):
        return get_backend(backend)
    if not isinstance(backend, Backend):
        raise TypeError(f"backend must be a name, an attention_ref.Backend or None, got {type(backend).__name__}")
    return backend
