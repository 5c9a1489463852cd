"""The backend interface: a thin executor of an :class:`AttentionPlan`.

Every backend runs the same front door (``validate_attention_args``) and packages its result the same
way; a backend only implements the arithmetic of SPEC.md for its framework, plus conversions from and
to NumPy arrays.
"""

from __future__ import annotations

import abc
from dataclasses import replace
from typing import Any, Literal, TypeVar, Unpack, overload

import numpy as np

from ..layers.params import MHAParams
from ..layers.plan import LayerPlan
from ..layers.validation import validate_layer_args, validate_layer_vjp_args
from ..mods import mask_pattern
from ..plan import DEFAULT_OPTIONS, AttentionKeywords, AttentionOptions, AttentionPlan
from ..result import AttentionOutput, Gradients, LayerGradients
from ..validation import DEFAULT_BLOCKS, validate_attention_args, validate_vjp_args
from ..varlen import packed_problem

ArrayT = TypeVar("ArrayT")


class Backend(abc.ABC):
    """One implementation of SPEC.md: subclass it, set ``name`` and ``framework``, and implement the
    four abstract methods (the arithmetic for one framework and the conversions to and from NumPy).
    The public methods validate every argument at the shared front door first.

    Shape letters: B... batch dims, Hq query heads, Hkv kv heads, L queries, S keys,
    E q/k head dim, Ev value head dim.
    """

    #: Registry name, e.g. ``"jax"``.
    name: str
    #: Framework of the arrays this backend takes and returns.
    framework: str
    #: The blocked algorithm's tile ``(block_q, block_k)`` when a call names none (rule 19).
    default_blocks: tuple[int, int] = DEFAULT_BLOCKS

    @overload
    def attention(self, q: ArrayT, k: ArrayT, v: ArrayT, *, return_weights: Literal[False] = ...,
                  return_lse: Literal[False] = ..., compute_dtype: Any = ..., block_q: int | None = ...,
                  block_k: int | None = ..., dense: bool = ..., **options: Unpack[AttentionKeywords]) -> ArrayT: ...
    @overload
    def attention(self, q: ArrayT, k: ArrayT, v: ArrayT, *, return_weights: Literal[True], return_lse: bool = ...,
                  compute_dtype: Any = ..., block_q: int | None = ..., block_k: int | None = ..., dense: bool = ...,
                  **options: Unpack[AttentionKeywords]) -> AttentionOutput: ...
    @overload
    def attention(self, q: ArrayT, k: ArrayT, v: ArrayT, *, return_weights: bool = ..., return_lse: Literal[True],
                  compute_dtype: Any = ..., block_q: int | None = ..., block_k: int | None = ..., dense: bool = ...,
                  **options: Unpack[AttentionKeywords]) -> AttentionOutput: ...
    @overload
    def attention(self, q: ArrayT, k: ArrayT, v: ArrayT, *, return_weights: bool = ..., return_lse: bool = ...,
                  compute_dtype: Any = ..., block_q: int | None = ..., block_k: int | None = ..., dense: bool = ...,
                  **options: Unpack[AttentionKeywords]) -> ArrayT | AttentionOutput: ...

    def attention(
        self,
        q: Any,
        k: Any,
        v: Any,
        *,
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
        """Scaled dot-product attention as SPEC.md defines it.

        q ``(*B, Hq, L, E)``, k ``(*B, Hkv, S, E)``, v ``(*B, Hkv, S, Ev)`` (or rank 2, one head);
        mask (bool, True = may attend), bias and dropout_mask (bool, True = keep) broadcastable to
        ``(*B, Hq, L, S)``; ``window=(left, right)`` (rule 7); ``dropout_p`` with its mask (rule 13);
        ``compute_dtype`` None, "float32" or "float64" (rule 10); ``block_q`` and ``block_k`` the
        blocked algorithm's tile (None: the backend's ``default_blocks``), ``dense=True`` the dense
        algorithm, which ``return_weights`` implies (rule 19).
        Returns out ``(*B, Hq, L, Ev)`` in the input dtype, or ``AttentionOutput(out, weights, lse)``
        when ``return_weights`` or ``return_lse`` is set (weights, before dropout, and lse in the
        compute dtype).
        """
        options = AttentionOptions(mask=mask, bias=bias, scale=scale, causal=causal, alignment=alignment,
                                   softcap=softcap, window=window, dropout_p=dropout_p, dropout_mask=dropout_mask,
                                   score_mod=score_mod, mask_mod=mask_mod)
        return self.attention_with(q, k, v, options, return_weights=return_weights, return_lse=return_lse,
                                   compute_dtype=compute_dtype, block_q=block_q, block_k=block_k, dense=dense)

    def attention_with(self, q: Any, k: Any, v: Any, options: AttentionOptions = DEFAULT_OPTIONS, *,
                       return_weights: bool = False, return_lse: bool = False, compute_dtype: Any = None,
                       block_q: int | None = None, block_k: int | None = None, dense: bool = False) -> Any:
        """``attention`` with its keywords as one ``AttentionOptions``."""
        plan = validate_attention_args(q, k, v, options, return_weights=return_weights, return_lse=return_lse,
                                       compute_dtype=compute_dtype, block_q=block_q, block_k=block_k, dense=dense,
                                       default_blocks=self.default_blocks, backend_framework=self.framework)
        plan, mask = self._with_mask_mod(plan, options, q)
        out, weights, lse = self._attention(plan, q, k, v, mask, options.bias, options.dropout_mask)
        if not (plan.return_weights or plan.return_lse):
            return out
        return AttentionOutput(out, weights if plan.return_weights else None, lse if plan.return_lse else None)

    def attention_vjp(
        self,
        q: ArrayT,
        k: ArrayT,
        v: ArrayT,
        d_out: ArrayT,
        *,
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
        """The gradients of ``sum(attention(q, k, v, **keywords) * d_out)`` (SPEC.md rule 14).

        The keywords are those of ``attention`` without the return flags (the blocked algorithm's
        backward recomputes the weights per tile, rule 19); d_out has out's shape and
        q's dtype. Returns ``Gradients(dq, dk, dv, dbias)``: dq, dk, dv in the input dtype, computed
        in the compute dtype; dbias (only when bias is given) in bias's shape and dtype. Excluded
        keys and fully excluded rows get exactly zero gradient.
        """
        options = AttentionOptions(mask=mask, bias=bias, scale=scale, causal=causal, alignment=alignment,
                                   softcap=softcap, window=window, dropout_p=dropout_p, dropout_mask=dropout_mask,
                                   score_mod=score_mod, mask_mod=mask_mod)
        return self.attention_vjp_with(q, k, v, d_out, options, compute_dtype=compute_dtype, block_q=block_q,
                                       block_k=block_k, dense=dense)

    def attention_vjp_with(self, q: Any, k: Any, v: Any, d_out: Any, options: AttentionOptions = DEFAULT_OPTIONS,
                           *, compute_dtype: Any = None, block_q: int | None = None, block_k: int | None = None,
                           dense: bool = False) -> Gradients:
        """``attention_vjp`` with its keywords as one ``AttentionOptions``."""
        plan = validate_vjp_args(q, k, v, d_out, options, compute_dtype=compute_dtype, block_q=block_q,
                                 block_k=block_k, dense=dense, default_blocks=self.default_blocks,
                                 backend_framework=self.framework)
        plan, mask = self._with_mask_mod(plan, options, q)
        dq, dk, dv, dbias = self._attention_vjp(plan, q, k, v, mask, options.bias, options.dropout_mask, d_out)
        return Gradients(dq, dk, dv, dbias if options.bias is not None else None)

    def multi_head_attention_with(
        self, query: Any, key: Any, value: Any, params: MHAParams, options: AttentionOptions = DEFAULT_OPTIONS, *,
        key_padding_mask: Any = None, return_weights: bool = False, return_lse: bool = False,
        compute_dtype: Any = None,
    ) -> Any:
        """The multi-head attention layer (SPEC.md rules 15-17), with the per-head attention's keywords
        as one ``AttentionOptions``; see ``attention_ref.multi_head_attention``."""
        plan = validate_layer_args(query, key, value, params, options, key_padding_mask=key_padding_mask,
                                   return_weights=return_weights, return_lse=return_lse,
                                   compute_dtype=compute_dtype, backend_framework=self.framework)
        out, weights, lse = self._multi_head_attention(plan, query, key, value, params, options.mask,
                                                       key_padding_mask, options.bias, options.dropout_mask)
        if not (plan.attention.return_weights or plan.attention.return_lse):
            return out
        return AttentionOutput(out, weights if plan.attention.return_weights else None,
                               lse if plan.attention.return_lse else None)

    def multi_head_attention_vjp_with(
        self, query: Any, key: Any, value: Any, params: MHAParams, d_out: Any,
        options: AttentionOptions = DEFAULT_OPTIONS, *, key_padding_mask: Any = None, compute_dtype: Any = None,
    ) -> LayerGradients:
        """The gradients of the layer (SPEC.md rule 18); see ``attention_ref.multi_head_attention_vjp``."""
        plan = validate_layer_vjp_args(query, key, value, params, d_out, options, key_padding_mask=key_padding_mask,
                                       compute_dtype=compute_dtype, backend_framework=self.framework)
        d_query, d_key, d_value, d_params, dbias = self._multi_head_attention_vjp(
            plan, query, key, value, params, options.mask, key_padding_mask, options.bias, options.dropout_mask, d_out)
        return LayerGradients(d_query, d_key, d_value, d_params, dbias if options.bias is not None else None)

    def varlen_attention(
        self, q: Any, k: Any, v: Any, cu_seqlens_q: Any, cu_seqlens_k: Any, *, seqused_k: Any = None,
        scale: float | None = None, causal: bool = False, alignment: str = "top_left", softcap: float | None = None,
        window: tuple[int | None, int | None] | None = None, return_lse: bool = False, compute_dtype: Any = None,
        block_q: int | None = None, block_k: int | None = None, dense: bool = False,
    ) -> Any:
        """Packed variable-length attention (SPEC.md rule 20), FlashAttention's layout: q
        ``(total_q, Hq, E)``, k ``(total_k, Hkv, E)``, v ``(total_k, Hkv, Ev)``, segment b the tokens
        ``cu_seqlens[b]:cu_seqlens[b + 1]`` of each (``(B + 1,)`` integers, concrete), each segment an
        independent attention with causal and the window aligned within it (``seqused_k``: only its
        first keys). Returns out ``(total_q, Hq, Ev)``, or ``AttentionOutput(out, None, lse)`` with
        lse ``(Hq, total_q)``; tokens in no segment get out 0 and lse -inf."""
        mask = packed_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, self.to_numpy, causal=causal,
                              alignment=alignment, window=window)
        result: Any = self.attention(q.swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1),
                                     mask=self.asarray_like(mask, q), scale=scale, softcap=softcap,
                                     return_lse=return_lse, compute_dtype=compute_dtype, block_q=block_q,
                                     block_k=block_k, dense=dense)
        if not return_lse:
            return result.swapaxes(0, 1)
        return AttentionOutput(result.out.swapaxes(0, 1), None, result.lse)

    def varlen_attention_vjp(
        self, q: Any, k: Any, v: Any, cu_seqlens_q: Any, cu_seqlens_k: Any, d_out: Any, *, seqused_k: Any = None,
        scale: float | None = None, causal: bool = False, alignment: str = "top_left", softcap: float | None = None,
        window: tuple[int | None, int | None] | None = None, compute_dtype: Any = None, block_q: int | None = None,
        block_k: int | None = None, dense: bool = False,
    ) -> Gradients:
        """The gradients of ``sum(varlen_attention(...) * d_out)`` (d_out ``(total_q, Hq, Ev)``):
        ``Gradients(dq, dk, dv, None)`` in the packed layout; tokens in no segment, and keys beyond
        ``seqused_k``, get exactly zero."""
        mask = packed_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, self.to_numpy, causal=causal,
                              alignment=alignment, window=window)
        grads = self.attention_vjp(q.swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1), d_out.swapaxes(0, 1),
                                   mask=self.asarray_like(mask, q), scale=scale, softcap=softcap,
                                   compute_dtype=compute_dtype, block_q=block_q, block_k=block_k, dense=dense)
        return Gradients(grads.dq.swapaxes(0, 1), grads.dk.swapaxes(0, 1), grads.dv.swapaxes(0, 1), None)

    def _with_mask_mod(self, plan: AttentionPlan, options: AttentionOptions, like: Any) -> tuple[AttentionPlan, Any]:
        """rule 22: ``(plan, mask)`` with the mask_mod's pattern, evaluated on int32 index arrays where
        ``like`` is, intersected with the mask (the plan then has a mask); without a mask_mod, the plan
        and mask as they are."""
        if options.mask_mod is None:
            return plan, options.mask
        pattern = mask_pattern(plan, options.mask_mod, lambda n: self.asarray_like(np.arange(n, dtype=np.int32), like))
        return replace(plan, has_mask=True), pattern if options.mask is None else options.mask & pattern

    def asarray_like(self, x: np.ndarray, like: Any) -> Any:
        """The NumPy array as an array of this framework where ``like`` is (its device)."""
        return self.asarray(x)

    @abc.abstractmethod
    def _attention(
        self, plan: AttentionPlan, q: Any, k: Any, v: Any, mask: Any, bias: Any, dropout_mask: Any
    ) -> tuple[Any, Any, Any]:
        """Compute ``(out, weights, lse)`` for a validated plan (mask, bias and dropout_mask None
        when absent), by the blocked algorithm when ``plan.blocked`` (rule 19), else the dense one.

        out has ``plan.out_shape`` in ``plan.dtype``; weights ``plan.logits_shape`` and lse
        ``plan.lse_shape`` in ``plan.compute_dtype`` (either may be None when not requested).
        """

    @abc.abstractmethod
    def _attention_vjp(
        self, plan: AttentionPlan, q: Any, k: Any, v: Any, mask: Any, bias: Any, dropout_mask: Any, d_out: Any
    ) -> tuple[Any, Any, Any, Any]:
        """``(dq, dk, dv, dbias)`` for a validated plan and cotangent ``d_out`` (dbias None or
        ignored when bias is None)."""

    def _multi_head_attention(
        self, plan: LayerPlan, query: Any, key: Any, value: Any, params: MHAParams, mask: Any, key_padding_mask: Any,
        bias: Any, dropout_mask: Any,
    ) -> tuple[Any, Any, Any]:
        """``(out, weights, lse)`` of the layer for a validated plan: out ``plan.out_shape`` in
        ``plan.dtype``; per-head weights ``(*B, H, L, S)`` and lse ``(*B, H, L)`` in the compute dtype.
        Optional for a registered backend (the built-in ones implement it)."""
        raise NotImplementedError(f"the {self.name} backend does not implement the multi-head attention layer")

    def _multi_head_attention_vjp(
        self, plan: LayerPlan, query: Any, key: Any, value: Any, params: MHAParams, mask: Any, key_padding_mask: Any,
        bias: Any, dropout_mask: Any, d_out: Any,
    ) -> tuple[Any, Any, Any, MHAParams, Any]:
        """``(d_query, d_key, d_value, d_params, dbias)`` for a validated plan and cotangent d_out."""
        raise NotImplementedError(f"the {self.name} backend does not implement the multi-head attention layer")

    @abc.abstractmethod
    def asarray(self, x: np.ndarray) -> Any:
        """Convert a NumPy array (bfloat16 via ml_dtypes included) to this framework, same dtype."""

    @abc.abstractmethod
    def to_numpy(self, x: Any) -> np.ndarray:
        """Convert an array of this framework to NumPy, same dtype (bfloat16 via ml_dtypes)."""

    def __repr__(self) -> str:
        return f"<attention_ref backend {self.name!r}>"
