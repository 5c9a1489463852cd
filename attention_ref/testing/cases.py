"""An attention case (NumPy inputs plus the spec's keyword arguments) and what SPEC.md says of it.

``AttentionCase`` holds the inputs of one call in the input dtype. The helpers here derive, from
SPEC.md directly and in float64, the facts the properties need: which keys each query attends
(rule 8), the kv heads repeated to the query heads (rule 2), the float64 oracle, and the error
bounds of ``attention_ref.tolerance``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..result import AttentionOutput
from ..tolerance import ErrorBounds, calibrated_error_bounds, error_bounds

#: Largest case (elements of q, k, v) whose arrays are printed in full in ``repr``.
_REPR_FULL_LIMIT = 256


@dataclass(frozen=True, eq=False)
class AttentionCase:
    """Inputs of one attention call: q ``(*B, Hq, L, E)``, k ``(*B, Hkv, S, E)``,
    v ``(*B, Hkv, S, Ev)`` (or rank 2), a boolean mask and a bias broadcastable to ``(*B, Hq, L, S)``,
    all NumPy arrays in the input dtype (bias too), and the keyword options."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    mask: np.ndarray | None = None
    bias: np.ndarray | None = None
    scale: float | None = None
    causal: bool = False
    alignment: str = "top_left"
    softcap: float | None = None

    # ---- shape --------------------------------------------------------------------------------
    @property
    def dtype(self) -> str:
        return self.q.dtype.name

    @property
    def has_head_axis(self) -> bool:
        return self.q.ndim >= 3

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return self.q.shape[:-3]

    @property
    def num_q_heads(self) -> int:
        return self.q.shape[-3] if self.has_head_axis else 1

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[-3] if self.has_head_axis else 1

    @property
    def q_len(self) -> int:
        return self.q.shape[-2]

    @property
    def kv_len(self) -> int:
        return self.k.shape[-2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[-1]

    @property
    def value_dim(self) -> int:
        return self.v.shape[-1]

    @property
    def logits_shape(self) -> tuple[int, ...]:
        return (*self.q.shape[:-1], self.kv_len)

    @property
    def resolved_scale(self) -> float:
        """The scale rule 3 applies: ``1/sqrt(E)`` when ``scale`` is None."""
        return 1.0 / math.sqrt(self.head_dim) if self.scale is None else float(self.scale)

    @property
    def default_compute_dtype(self) -> str:
        return "float64" if self.dtype == "float64" else "float32"

    # ---- derived ------------------------------------------------------------------------------
    def options(self) -> dict[str, Any]:
        """The keyword arguments of the call, arrays excluded."""
        return dict(scale=self.scale, causal=self.causal, alignment=self.alignment, softcap=self.softcap)

    def replace(self, **changes: Any) -> AttentionCase:
        return dataclasses.replace(self, **changes)

    def causal_pattern(self) -> np.ndarray:
        """``(L, S)`` bool: rule 7's causal pattern for this case's alignment."""
        offset = 0 if self.alignment == "top_left" else self.kv_len - self.q_len
        return np.arange(self.kv_len) <= np.arange(self.q_len)[:, None] + offset

    def allowed(self) -> np.ndarray:
        """``(*B, Hq, L, S)`` bool: True where query i attends key j (rule 8)."""
        allowed = np.ones(self.logits_shape, dtype=bool)
        if self.mask is not None:
            allowed &= self.mask
        if self.causal:
            allowed &= self.causal_pattern()
        if self.bias is not None:
            allowed &= np.asarray(self.bias, dtype=np.float64) != -np.inf
        return allowed

    def with_causal_as_mask(self) -> AttentionCase:
        """The same case with ``causal`` replaced by the explicit mask it stands for (rule 7)."""
        if not self.causal:
            return self
        mask = self.causal_pattern() if self.mask is None else self.mask & self.causal_pattern()
        return self.replace(mask=mask, causal=False)

    def repeated_kv(self) -> tuple[np.ndarray, np.ndarray]:
        """k and v with each kv head repeated ``Hq // Hkv`` times, in repeat_interleave order (rule 2)."""
        if not self.has_head_axis:
            return self.k, self.v
        group = self.num_q_heads // self.num_kv_heads
        return np.repeat(self.k, group, axis=-3), np.repeat(self.v, group, axis=-3)

    def logits(self) -> np.ndarray:
        """``(*B, Hq, L, S)`` float64 logits of rules 3-5: scaled, capped, biased (not masked)."""
        k, _ = self.repeated_kv()
        logits = self.resolved_scale * np.matmul(
            np.asarray(self.q, np.float64), np.swapaxes(np.asarray(k, np.float64), -1, -2)
        )
        if self.softcap is not None:
            logits = self.softcap * np.tanh(logits / self.softcap)
        if self.bias is not None:
            logits = logits + np.asarray(self.bias, np.float64)
        return logits

    def oracle(self) -> AttentionOutput:
        """The float64 oracle: the NumPy backend on the inputs converted (exactly) to float64, so
        that out, weights and lse are all float64, never rounded to the input dtype."""
        from ..registry import get_backend

        q, k, v, bias = (None if x is None else np.asarray(x, np.float64) for x in (self.q, self.k, self.v, self.bias))
        return get_backend("numpy").attention(
            q, k, v, mask=self.mask, bias=bias, **self.options(), return_weights=True, return_lse=True,
        )

    def bounds(
        self,
        *,
        compute_dtype: str | None = None,
        out_dtype: str | None = None,
        oracle: AttentionOutput | None = None,
        extra_logit_error: np.ndarray | float = 0.0,
        calibrated: bool = False,
    ) -> ErrorBounds:
        """``attention_ref.tolerance.error_bounds`` for this case (default: the spec's compute dtype
        and the input dtype); with ``calibrated``, the calibrated rule for other people's kernels
        (``attention_ref.tolerance.calibrated_error_bounds``)."""
        oracle = self.oracle() if oracle is None else oracle
        k, v = self.repeated_kv()
        data = dict(allowed=self.allowed(), bias=self.bias, scale=self.resolved_scale, softcap=self.softcap,
                    expected_out=oracle.out, expected_weights=oracle.weights, expected_lse=oracle.lse)
        derived = error_bounds(self.q, k, v, **data, compute_dtype=compute_dtype or self.default_compute_dtype,
                               out_dtype=out_dtype or self.dtype, extra_logit_error=extra_logit_error)
        if not calibrated:
            return derived
        return calibrated_error_bounds(derived, self.q, k, v, **data, dtype=self.dtype)

    def __repr__(self) -> str:
        def show(x: np.ndarray | None) -> str:
            if x is None:
                return "None"
            if self.q.size + self.k.size + self.v.size <= _REPR_FULL_LIMIT:
                body = np.array2string(np.asarray(x, dtype=np.float64) if x.dtype != bool else x,
                                       separator=", ", threshold=10**6, max_line_width=10**6)
                return f"np.array({body}, dtype={x.dtype.name!r})"
            return f"<{x.dtype.name} array {x.shape}>"

        options = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return (
            f"AttentionCase(q={show(self.q)}, k={show(self.k)}, v={show(self.v)}, "
            f"mask={show(self.mask)}, bias={show(self.bias)}, {options})"
            f"  # q {self.q.shape}, k {self.k.shape}, v {self.v.shape}, {self.dtype}"
        )


def call(impl: Any, case: AttentionCase, **kwargs: Any) -> AttentionOutput:
    """Run ``impl.attention`` on the case converted with ``impl.asarray``; returns NumPy results.

    ``kwargs`` override the case's options and add flags (``return_weights``...). When the call
    returns a bare array it is wrapped as ``AttentionOutput(out, None, None)``.
    """
    arrays = {
        name: None if x is None else impl.asarray(x)
        for name, x in (("q", case.q), ("k", case.k), ("v", case.v), ("mask", case.mask), ("bias", case.bias))
    }
    options = {**case.options(), **kwargs}
    result = impl.attention(arrays.pop("q"), arrays.pop("k"), arrays.pop("v"), **arrays, **options)
    if not isinstance(result, AttentionOutput):
        return AttentionOutput(impl.to_numpy(result))
    return AttentionOutput(*(None if x is None else impl.to_numpy(x) for x in result))
