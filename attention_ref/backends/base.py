"""The backend interface: a thin executor of an :class:`AttentionPlan`.

Every backend runs the same front door (``validate_attention_args``) and packages its result the same
way; a backend only implements the arithmetic of SPEC.md for its framework, plus conversions from and
to NumPy arrays.
"""

from __future__ import annotations

import abc
from typing import Any

import numpy as np

from ..result import AttentionOutput, Gradients
from ..plan import AttentionPlan
from ..validation import validate_attention_args, validate_vjp_args


class Backend(abc.ABC):
    """One implementation of SPEC.md.

    Shape letters: B... batch dims, Hq query heads, Hkv kv heads, L queries, S keys,
    E q/k head dim, Ev value head dim.
    """

    #: Registry name, e.g. ``"jax"``.
    name: str
    #: Framework of the arrays this backend takes and returns.
    framework: str

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
        return_weights: bool = False,
        return_lse: bool = False,
        compute_dtype: str | None = None,
    ) -> Any:
        """Scaled dot-product attention as SPEC.md defines it.

        q ``(*B, Hq, L, E)``, k ``(*B, Hkv, S, E)``, v ``(*B, Hkv, S, Ev)`` (or rank 2, one head);
        mask (bool, True = may attend), bias and dropout_mask (bool, True = keep) broadcastable to
        ``(*B, Hq, L, S)``; ``window=(left, right)`` (rule 7); ``dropout_p`` with its mask (rule 13).
        Returns out ``(*B, Hq, L, Ev)`` in the input dtype, or ``AttentionOutput(out, weights, lse)``
        when ``return_weights`` or ``return_lse`` is set (weights, before dropout, and lse in the
        compute dtype).
        """
        plan = validate_attention_args(
            q, k, v, mask=mask, bias=bias, scale=scale, causal=causal, alignment=alignment,
            softcap=softcap, window=window, dropout_p=dropout_p, dropout_mask=dropout_mask,
            return_weights=return_weights, return_lse=return_lse,
            compute_dtype=compute_dtype, backend_framework=self.framework,
        )
        out, weights, lse = self._attention(plan, q, k, v, mask, bias, dropout_mask)
        if not (plan.return_weights or plan.return_lse):
            return out
        return AttentionOutput(
            out, weights if plan.return_weights else None, lse if plan.return_lse else None
        )

    def attention_vjp(self, q: Any, k: Any, v: Any, d_out: Any, **keywords: Any) -> Gradients:
        """The gradients of ``sum(attention(q, k, v, **keywords) * d_out)`` (SPEC.md rule 14).

        ``keywords`` are those of ``attention`` without the return flags; d_out has out's shape and
        q's dtype. Returns ``Gradients(dq, dk, dv, dbias)``: dq, dk, dv in the input dtype, computed
        in the compute dtype; dbias (only when bias is given) in bias's shape and dtype. Excluded
        keys and fully excluded rows get exactly zero gradient.
        """
        plan = validate_vjp_args(q, k, v, d_out, **keywords, backend_framework=self.framework)
        mask, bias, dropout_mask = (keywords.get(name) for name in ("mask", "bias", "dropout_mask"))
        dq, dk, dv, dbias = self._attention_vjp(plan, q, k, v, mask, bias, dropout_mask, d_out)
        return Gradients(dq, dk, dv, dbias if bias is not None else None)

    @abc.abstractmethod
    def _attention(
        self, plan: AttentionPlan, q: Any, k: Any, v: Any, mask: Any, bias: Any, dropout_mask: Any
    ) -> tuple[Any, Any, Any]:
        """Compute ``(out, weights, lse)`` for a validated plan (mask, bias and dropout_mask None
        when absent).

        out has ``plan.out_shape`` in ``plan.dtype``; weights ``plan.logits_shape`` and lse
        ``plan.lse_shape`` in ``plan.compute_dtype`` (either may be None when not requested).
        """

    @abc.abstractmethod
    def _attention_vjp(
        self, plan: AttentionPlan, q: Any, k: Any, v: Any, mask: Any, bias: Any, dropout_mask: Any, d_out: Any
    ) -> tuple[Any, Any, Any, Any]:
        """``(dq, dk, dv, dbias)`` for a validated plan and cotangent ``d_out`` (dbias None or
        ignored when bias is None)."""

    @abc.abstractmethod
    def asarray(self, x: np.ndarray) -> Any:
        """Convert a NumPy array (bfloat16 via ml_dtypes included) to this framework, same dtype."""

    @abc.abstractmethod
    def to_numpy(self, x: Any) -> np.ndarray:
        """Convert an array of this framework to NumPy, same dtype (bfloat16 via ml_dtypes)."""

    def __repr__(self) -> str:
        return f"<attention_ref backend {self.name!r}>"
