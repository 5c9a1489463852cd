"""attention_ref: one specification of scaled dot-product attention, three backends (NumPy, JAX,
PyTorch) loaded by name, and the property tests that prove them. See SPEC.md for the rules.

Importing this package imports neither jax nor torch.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar, Unpack, overload

from . import distributed, flex, layers, paged, varlen
from .backends.base import Backend
from .dropout import dropout_mask
from .layers.params import MHAParams
from .paged import paged_attention, paged_attention_vjp
from .plan import AttentionKeywords, AttentionOptions
from .registry import (
    BackendNotAvailableError,
    available_backends,
    backend_for,
    get_backend,
    known_backends,
    register_backend,
)
from .result import AttentionOutput, Gradients, LayerGradients

__all__ = [
    "AttentionOptions",
    "AttentionOutput",
    "Backend",
    "BackendNotAvailableError",
    "Gradients",
    "LayerGradients",
    "__version__",
    "attention",
    "attention_vjp",
    "available_backends",
    "distributed",
    "dropout_mask",
    "flex",
    "get_backend",
    "known_backends",
    "layers",
    "multi_head_attention",
    "multi_head_attention_vjp",
    "paged",
    "paged_attention",
    "paged_attention_vjp",
    "register_backend",
    "varlen",
    "varlen_attention",
    "varlen_attention_vjp",
]

#: The package version (pyproject.toml reads it from here).
__version__ = "0.1.0"

ArrayT = TypeVar("ArrayT")


@overload
def attention(q: ArrayT, k: ArrayT, v: ArrayT, *, backend: str | Backend | None = ...,
              return_weights: Literal[False] = ..., return_lse: Literal[False] = ..., compute_dtype: Any = ...,
              block_q: int | None = ..., block_k: int | None = ..., dense: bool = ...,
              **options: Unpack[AttentionKeywords]) -> ArrayT: ...
@overload
def attention(q: ArrayT, k: ArrayT, v: ArrayT, *, backend: str | Backend | None = ..., return_weights: Literal[True],
              return_lse: bool = ..., compute_dtype: Any = ...,
              block_q: int | None = ..., block_k: int | None = ..., dense: bool = ...,
              **options: Unpack[AttentionKeywords]) -> AttentionOutput: ...
@overload
def attention(q: ArrayT, k: ArrayT, v: ArrayT, *, backend: str | Backend | None = ..., return_weights: bool = ...,
              return_lse: Literal[True], compute_dtype: Any = ...,
              block_q: int | None = ..., block_k: int | None = ..., dense: bool = ...,
              **options: Unpack[AttentionKeywords]) -> AttentionOutput: ...
@overload
def attention(q: ArrayT, k: ArrayT, v: ArrayT, *, backend: str | Backend | None = ..., return_weights: bool = ...,
              return_lse: bool = ..., compute_dtype: Any = ...,
              block_q: int | None = ..., block_k: int | None = ..., dense: bool = ...,
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
    score_mod: Any = None,
    mask_mod: Any = None,
    return_weights: bool = False,
    return_lse: bool = False,
    compute_dtype: Any = None,
    block_q: int | None = None,
    block_k: int | None = None,
    dense: bool = False,
) -> Any:
    """Scaled dot-product attention (SPEC.md) on ``backend``: a name, a backend object, or None to
    use the backend of q's framework. The other arguments are those of ``Backend.attention``:
    q ``(*B, Hq, L, E)``, k ``(*B, Hkv, S, E)``, v ``(*B, Hkv, S, Ev)``; returns out ``(*B, Hq, L, Ev)``,
    or ``AttentionOutput(out, weights, lse)`` with a return flag."""
    options = AttentionOptions(mask=mask, bias=bias, scale=scale, causal=causal, alignment=alignment,
                               softcap=softcap, window=window, dropout_p=dropout_p, dropout_mask=dropout_mask,
                               score_mod=score_mod, mask_mod=mask_mod)
    return _resolve(backend, q).attention_with(q, k, v, options, return_weights=return_weights,
                                               return_lse=return_lse, compute_dtype=compute_dtype, block_q=block_q,
                                               block_k=block_k, dense=dense)


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
    score_mod: Any = None,
    mask_mod: Any = None,
    compute_dtype: Any = None,
    block_q: int | None = None,
    block_k: int | None = None,
    dense: bool = False,
) -> Gradients:
    """The gradients of attention (SPEC.md rule 14) on ``backend`` (as for ``attention``):
    ``Gradients(dq, dk, dv, dbias)`` of ``sum(attention(q, k, v, **keywords) * d_out)``."""
    options = AttentionOptions(mask=mask, bias=bias, scale=scale, causal=causal, alignment=alignment,
                               softcap=softcap, window=window, dropout_p=dropout_p, dropout_mask=dropout_mask,
                               score_mod=score_mod, mask_mod=mask_mod)
    return _resolve(backend, q).attention_vjp_with(q, k, v, d_out, options, compute_dtype=compute_dtype,
                                                   block_q=block_q, block_k=block_k, dense=dense)


def varlen_attention(
    q: ArrayT,
    k: ArrayT,
    v: ArrayT,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    *,
    backend: str | Backend | None = None,
    seqused_k: Any = None,
    scale: float | None = None,
    causal: bool = False,
    alignment: str = "top_left",
    softcap: float | None = None,
    window: tuple[int | None, int | None] | None = None,
    return_lse: bool = False,
    compute_dtype: Any = None,
    block_q: int | None = None,
    block_k: int | None = None,
    dense: bool = False,
) -> Any:
    """Packed variable-length attention (SPEC.md rule 20) on ``backend`` (as for ``attention``): q
    ``(total_q, Hq, E)``, k ``(total_k, Hkv, E)``, v ``(total_k, Hkv, Ev)``, ``cu_seqlens_q`` and
    ``cu_seqlens_k`` ``(B + 1,)`` (FlashAttention's layout; ``attention_ref.varlen`` converts
    padded batches and segment ids). Each segment is its own attention, causal and the window aligned
    within it. Returns out ``(total_q, Hq, Ev)``, or ``AttentionOutput(out, None, lse)`` with lse
    ``(Hq, total_q)``; see ``Backend.varlen_attention``."""
    return _resolve(backend, q).varlen_attention(
        q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k=seqused_k, scale=scale, causal=causal, alignment=alignment,
        softcap=softcap, window=window, return_lse=return_lse, compute_dtype=compute_dtype, block_q=block_q,
        block_k=block_k, dense=dense)


def varlen_attention_vjp(
    q: ArrayT,
    k: ArrayT,
    v: ArrayT,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    d_out: ArrayT,
    *,
    backend: str | Backend | None = None,
    seqused_k: Any = None,
    scale: float | None = None,
    causal: bool = False,
    alignment: str = "top_left",
    softcap: float | None = None,
    window: tuple[int | None, int | None] | None = None,
    compute_dtype: Any = None,
    block_q: int | None = None,
    block_k: int | None = None,
    dense: bool = False,
) -> Gradients:
    """The gradients of ``varlen_attention`` (SPEC.md rule 20): ``Gradients(dq, dk, dv, None)`` in the
    packed layout of ``sum(varlen_attention(...) * d_out)``."""
    return _resolve(backend, q).varlen_attention_vjp(
        q, k, v, cu_seqlens_q, cu_seqlens_k, d_out, seqused_k=seqused_k, scale=scale, causal=causal,
        alignment=alignment, softcap=softcap, window=window, compute_dtype=compute_dtype, block_q=block_q,
        block_k=block_k, dense=dense)


def multi_head_attention(
    query: Any,
    key: Any,
    value: Any,
    params: MHAParams,
    *,
    mask: Any = None,
    key_padding_mask: Any = None,
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
    backend: str | Backend | None = None,
) -> Any:
    """The multi-head attention layer (SPEC.md rules 15-18): project, run ``attention`` per head,
    project out.

    query ``(*B, L, d_q)``, key ``(*B, S, d_k)``, value ``(*B, S, d_v)``; ``params`` an
    ``attention_ref.layers.MHAParams`` (wq ``(d_q, H, hd)``, wk ``(d_k, Hkv, hd)``, wv
    ``(d_v, Hkv, hd_v)``, wo ``(H, hd_v, d_out)``, optional biases), all of one dtype.

    **Mask polarity: True = attend, everywhere.** ``mask`` (bool, True = may attend), ``bias`` and
    ``dropout_mask`` (bool, True = keep) are broadcastable to the per-head logits ``(*B, H, L, S)``;
    ``key_padding_mask`` is bool ``(*B, S)`` with **True = a real token** (the opposite of torch
    ``nn.MultiheadAttention``'s ``key_padding_mask``; ``attention_ref.layers.from_torch_masks``
    converts) and is combined with ``mask`` by intersection. A query whose keys are all excluded
    attends nothing: its o is 0 (rule 8) and its out is ``bo``. The other keywords are those of
    ``attention``; the default scale is ``1 / sqrt(hd)``.

    Returns out ``(*B, L, d_out)`` in the input dtype, or ``AttentionOutput(out, weights, lse)`` with
    a return flag: per-head weights ``(*B, H, L, S)``, before dropout, and lse ``(*B, H, L)``, in the
    compute dtype (``attention_ref.layers.average_weights`` gives torch's head-averaged view).
    """
    options = AttentionOptions(mask=mask, bias=bias, scale=scale, causal=causal, alignment=alignment,
                               softcap=softcap, window=window, dropout_p=dropout_p, dropout_mask=dropout_mask)
    return _resolve(backend, query).multi_head_attention_with(
        query, key, value, params, options, key_padding_mask=key_padding_mask, return_weights=return_weights,
        return_lse=return_lse, compute_dtype=compute_dtype)


def multi_head_attention_vjp(
    query: Any,
    key: Any,
    value: Any,
    params: MHAParams,
    d_out: Any,
    *,
    mask: Any = None,
    key_padding_mask: Any = None,
    bias: Any = None,
    scale: float | None = None,
    causal: bool = False,
    alignment: str = "top_left",
    softcap: float | None = None,
    window: tuple[int | None, int | None] | None = None,
    dropout_p: float = 0.0,
    dropout_mask: Any = None,
    compute_dtype: Any = None,
    backend: str | Backend | None = None,
) -> LayerGradients:
    """The gradients of the layer (SPEC.md rule 18): ``LayerGradients(d_query, d_key, d_value, params,
    dbias)`` of ``sum(multi_head_attention(query, key, value, params, **keywords) * d_out)``, d_out
    ``(*B, L, d_out)`` in the input dtype; ``params`` is an ``MHAParams`` of the parameters'
    gradients. The keywords are those of ``multi_head_attention`` without the return flags."""
    options = AttentionOptions(mask=mask, bias=bias, scale=scale, causal=causal, alignment=alignment,
                               softcap=softcap, window=window, dropout_p=dropout_p, dropout_mask=dropout_mask)
    return _resolve(backend, query).multi_head_attention_vjp_with(
        query, key, value, params, d_out, options, key_padding_mask=key_padding_mask, compute_dtype=compute_dtype)


def _resolve(backend: str | Backend | None, q: Any) -> Backend:
    if backend is None:
        return backend_for(q)
    if isinstance(backend, str):
        return get_backend(backend)
    if not isinstance(backend, Backend):
        raise TypeError(f"backend must be a name, an attention_ref.Backend or None, got {type(backend).__name__}")
    return backend
