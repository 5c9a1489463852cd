"""An attention case (NumPy inputs plus the spec's keyword arguments) and what SPEC.md says of it.

``AttentionCase`` holds the inputs of one call in the input dtype. The helpers here derive, from
SPEC.md directly and in float64, the facts the properties need: which keys each query attends
(rule 8), the kv heads repeated to the query heads (rule 2), the float64 oracle (computed once per
case), and the error bounds of ``attention_ref.tolerance``. ``call``, ``call_vjp`` and
``full_results`` run an implementation on a case.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from ..broadcasting import reduce_to_shape
from ..frameworks import numpy_dtype
from ..plan import AttentionOptions
from ..result import AttentionOutput, Gradients
from ..tolerance import (
    ErrorBounds,
    GradientBounds,
    GradientProblem,
    calibrated_error_bounds,
    calibrated_gradient_bounds,
    error_bounds,
    gradient_error_bounds,
    row_sizes,
)

if TYPE_CHECKING:
    from .implementation import Implementation

_T = TypeVar("_T")

#: Largest case (elements of q, k, v) whose arrays are printed in full in ``repr``.
_REPR_FULL_LIMIT = 256


@dataclass(frozen=True, eq=False)
class AttentionCase(AttentionOptions):
    """Inputs of one attention call: q ``(*B, Hq, L, E)``, k ``(*B, Hkv, S, E)``,
    v ``(*B, Hkv, S, Ev)`` (or rank 2), and the keyword options of ``AttentionOptions`` (keyword-only:
    ``AttentionCase(q, k, v, mask=...)``), whose mask, bias (in its own floating dtype) and dropout
    keep-mask are NumPy arrays broadcastable to ``(*B, Hq, L, S)``, or None.

    Cases compare and hash by identity (arrays have no single truth value). The float64 oracle of a
    case is computed once and kept with it (read-only arrays); ``replace`` makes a new case.
    """

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray

    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def _cached(self, key: Any, compute: Callable[[], _T]) -> _T:
        """``compute()``, once per case and ``key`` (a private cache: the dataclass is frozen)."""
        cache: dict[Any, Any] | None = self.__dict__.get("_cache")
        if cache is None:
            cache = {}
            object.__setattr__(self, "_cache", cache)
        if key not in cache:
            cache[key] = compute()
        return cache[key]

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

    def output_shapes(self) -> AttentionOutput:
        """The shapes of the results (rule 11): out ``(*B, Hq, L, Ev)``, weights ``(*B, Hq, L, S)``,
        lse ``(*B, Hq, L)``."""
        return AttentionOutput((*self.logits_shape[:-1], self.value_dim), self.logits_shape, self.logits_shape[:-1])

    @property
    def resolved_scale(self) -> float:
        """The scale rule 3 applies: ``1/sqrt(E)`` when ``scale`` is None."""
        return 1.0 / math.sqrt(self.head_dim) if self.scale is None else float(self.scale)

    @property
    def default_compute_dtype(self) -> str:
        return "float64" if self.dtype == "float64" else "float32"

    # ---- derived ------------------------------------------------------------------------------
    def dropout_multiplier(self) -> np.ndarray | float:
        """``keep / (1 - dropout_p)`` broadcast to ``(*B, Hq, L, S)`` (float64), or 1.0 without a
        dropout mask: what the probabilities are multiplied by before P·V (rule 13)."""
        if self.dropout_mask is None:
            return 1.0
        keep = np.broadcast_to(self.dropout_mask, self.logits_shape)
        return np.where(keep, 1.0 / (1.0 - self.dropout_p), 0.0)

    def replace(self, **changes: Any) -> AttentionCase:
        return dataclasses.replace(self, **changes)

    def positional_pattern(self) -> np.ndarray:
        """``(L, S)`` bool: rule 7's pattern for causal and the window at this case's alignment,
        written from the rule: query i may attend key j iff ``i + offset - left <= j`` and
        ``j <= i + offset + right`` (right = 0 under causal), offset 0 or ``S - L``."""
        offset = 0 if self.alignment == "top_left" else self.kv_len - self.q_len
        i, j = np.arange(self.q_len)[:, None], np.arange(self.kv_len)
        pattern = np.ones((self.q_len, self.kv_len), dtype=bool)
        left, right = self.window if self.window is not None else (None, None)
        if self.causal:
            pattern &= j <= i + offset
        if left is not None:
            pattern &= i + offset - left <= j
        if right is not None:
            pattern &= j <= i + offset + right
        return pattern

    def allowed(self) -> np.ndarray:
        """``(*B, Hq, L, S)`` bool: True where query i attends key j (rule 8)."""
        allowed = np.ones(self.logits_shape, dtype=bool)
        if self.mask is not None:
            allowed &= self.mask
        if self.causal or self.window is not None:
            allowed &= self.positional_pattern()
        if self.bias is not None:
            allowed &= np.asarray(self.bias, dtype=np.float64) != -np.inf
        return allowed

    def with_positions_as_mask(self) -> AttentionCase:
        """The same case with ``causal`` and ``window`` replaced by the explicit mask they stand for
        (rule 7)."""
        if not self.causal and self.window is None:
            return self
        pattern = self.positional_pattern()
        mask = pattern if self.mask is None else self.mask & pattern
        return self.replace(mask=mask, causal=False, window=None)

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

    def _float64_call(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """q, k, v converted (exactly) to float64, and the keywords with the bias in float64."""
        q, k, v = (np.asarray(x, np.float64) for x in (self.q, self.k, self.v))
        bias = None if self.bias is None else np.asarray(self.bias, np.float64)
        return q, k, v, {**self.array_keywords(), "bias": bias, **self.scalar_keywords()}

    def oracle(self) -> AttentionOutput:
        """The float64 oracle: the NumPy backend on the inputs converted (exactly) to float64, so
        that out, weights and lse are all float64, never rounded to the input dtype. Computed once
        per case (the arrays are read-only)."""

        def compute() -> AttentionOutput:
            from ..registry import get_backend

            q, k, v, keywords = self._float64_call()
            return AttentionOutput(*_read_only(get_backend("numpy").attention(
                q, k, v, **keywords, return_weights=True, return_lse=True)))

        return self._cached("oracle", compute)

    def oracle_gradients(self, d_out: np.ndarray) -> Gradients:
        """The float64 oracle's gradients (the NumPy backend's analytic backward pass of rule 14, dense,
        in float64) for the cotangent ``d_out``; dbias is float64 too. Computed once per case and cotangent (the
        arrays are read-only)."""
        d_out = np.asarray(d_out)

        def compute() -> Gradients:
            from ..registry import get_backend

            q, k, v, keywords = self._float64_call()
            return Gradients(*_read_only(get_backend("numpy").attention_vjp(
                q, k, v, np.asarray(d_out, np.float64), **keywords, dense=True)))

        return self._cached(("oracle_gradients", d_out.dtype.str, d_out.shape, d_out.tobytes()), compute)

    def bounds(
        self,
        *,
        compute_dtype: str | None = None,
        out_dtype: str | None = None,
        oracle: AttentionOutput | None = None,
        extra_logit_error: np.ndarray | float = 0.0,
        calibrated: bool = False,
        key_block: int | None = None,
    ) -> ErrorBounds:
        """``attention_ref.tolerance.error_bounds`` for this case (default: the spec's compute dtype
        and the input dtype); with ``calibrated``, the calibrated rule for other people's kernels
        (``attention_ref.tolerance.calibrated_error_bounds``); ``key_block`` the blocked algorithm's
        ``block_k`` (rule 19; None: dense)."""
        oracle = self.oracle() if oracle is None else oracle
        k, v = self.repeated_kv()
        data = dict(allowed=self.allowed(), bias=self.bias, scale=self.resolved_scale, softcap=self.softcap,
                    dropout_multiplier=self.dropout_multiplier(),
                    expected_out=oracle.out, expected_weights=oracle.weights, expected_lse=oracle.lse)
        derived = error_bounds(self.q, k, v, **data, compute_dtype=compute_dtype or self.default_compute_dtype,
                               out_dtype=out_dtype or self.dtype, extra_logit_error=extra_logit_error,
                               key_block=key_block)
        if not calibrated:
            return derived
        return calibrated_error_bounds(derived, self.q, k, v, **data, dtype=self.dtype)

    def gradient_problem(self, d_out: np.ndarray, oracle: AttentionOutput | None = None) -> GradientProblem:
        """The float64 description of this case's backward pass for the cotangent ``d_out``."""
        oracle = self.oracle() if oracle is None else oracle
        k, v = self.repeated_kv()
        q64, k64, v64 = (np.asarray(x, np.float64) for x in (self.q, k, v))
        multiplier = np.broadcast_to(np.asarray(self.dropout_multiplier(), np.float64), self.logits_shape)
        return GradientProblem(q64, k64, v64, np.asarray(d_out, np.float64), self.allowed(),
                               np.asarray(oracle.weights, np.float64), multiplier,
                               None if self.bias is None else np.asarray(self.bias, np.float64),
                               None if self.bias is None else self.bias.shape, self.resolved_scale, self.softcap,
                               self.num_q_heads // self.num_kv_heads,
                               None if self.bias is None else self.bias.dtype.name)

    def gradient_bounds(self, d_out: np.ndarray, expected: Gradients, *, compute_dtype: str | None = None,
                        oracle: AttentionOutput | None = None, calibrated: bool = False,
                        key_block: int | None = None) -> GradientBounds:
        """``attention_ref.tolerance.gradients`` bounds for this case's gradients (default: the spec's
        compute dtype, results in the input dtype and dbias in bias's dtype); ``expected`` is the
        oracle's ``Gradients``; with ``calibrated``, the calibrated rule for other people's kernels."""
        problem = self.gradient_problem(d_out, oracle)
        dot_size, bias_size = row_sizes(problem.q, problem.k, allowed=problem.allowed, bias=problem.bias,
                                        scale=self.resolved_scale)
        derived = gradient_error_bounds(problem, tuple(expected),
                                        compute_dtype=compute_dtype or self.default_compute_dtype,
                                        out_dtype=self.dtype,
                                        bias_dtype=None if self.bias is None else self.bias.dtype.name,
                                        dot_size=dot_size, bias_size=bias_size, key_block=key_block)
        if not calibrated:
            return derived
        return calibrated_gradient_bounds(derived, problem, tuple(expected), self.dtype)

    def structural_zero_gradients(self) -> Gradients:
        """Where SPEC.md fixes a gradient to exactly 0 (bool, shapes of q, k, v, bias): dq of fully
        excluded rows, dk and dv of keys that no query of the kv head's group attends or keeps (dropout),
        dbias wherever every entry it is summed over is excluded."""
        allowed = self.allowed()
        contributes = allowed
        if self.dropout_mask is not None:
            contributes = allowed & np.broadcast_to(self.dropout_mask, self.logits_shape)
        dq = np.broadcast_to(~np.asarray(allowed.any(axis=-1))[..., None], self.q.shape)
        used = np.asarray(allowed.any(axis=-2))  # (*B, Hq, S): some query attends the key (gradients through dk)
        kept = np.asarray(contributes.any(axis=-2))  # ... and keeps it (gradients through dv)
        if self.has_head_axis:
            group = self.num_q_heads // self.num_kv_heads
            used, kept = (np.asarray(x.reshape(*x.shape[:-2], self.num_kv_heads, group, self.kv_len).any(axis=-2))
                          for x in (used, kept))
        dk = np.broadcast_to(~used[..., None], self.k.shape)
        dv = np.broadcast_to(~kept[..., None], self.v.shape)
        dbias = None
        if self.bias is not None:
            dbias = reduce_to_shape(allowed.astype(np.int64), self.bias.shape) == 0
        return Gradients(dq, dk, dv, dbias)

    def record(self) -> dict[str, Any]:
        """The case as plain values (``report.case_record``): ``kind`` "attention", ``dtype``, the
        ``shapes`` of q, k, v, mask, bias and dropout_mask (None when absent), the scalar ``options``
        (``scalar_keywords``; window as a list), ``arrays``: every array as nested lists (float64
        values, booleans for masks) when the case is small enough to print in full (as ``repr``
        does), else None, and ``repr``."""
        named = {"q": self.q, "k": self.k, "v": self.v, "mask": self.mask, "bias": self.bias,
                 "dropout_mask": self.dropout_mask}
        small = self.q.size + self.k.size + self.v.size <= _REPR_FULL_LIMIT
        options = {key: list(value) if isinstance(value, tuple) else repr(value) if callable(value) else value
                   for key, value in self.scalar_keywords().items()}
        return {
            "kind": "attention",
            "dtype": self.dtype,
            "shapes": {name: None if x is None else list(np.shape(x)) for name, x in named.items()},
            "options": options,
            "arrays": {name: None if x is None else np.asarray(x, dtype=bool if np.asarray(x).dtype == bool
                                                                 else np.float64).tolist()
                       for name, x in named.items()} if small else None,
            "repr": repr(self),
        }

    def __repr__(self) -> str:
        def show(x: np.ndarray | None) -> str:
            if x is None:
                return "None"
            if self.q.size + self.k.size + self.v.size <= _REPR_FULL_LIMIT:
                body = np.array2string(np.asarray(x, dtype=np.float64) if x.dtype != bool else x,
                                       separator=", ", threshold=10**6, max_line_width=10**6)
                return f"np.array({body}, dtype={x.dtype.name!r})"
            return f"<{x.dtype.name} array {x.shape}>"

        options = ", ".join(f"{k}={v!r}" for k, v in self.scalar_keywords().items())
        dropout = "" if self.dropout_mask is None else f", dropout_mask={show(self.dropout_mask)}"
        return (
            f"AttentionCase(q={show(self.q)}, k={show(self.k)}, v={show(self.v)}, "
            f"mask={show(self.mask)}, bias={show(self.bias)}{dropout}, {options})"
            f"  # q {self.q.shape}, k {self.k.shape}, v {self.v.shape}, {self.dtype}"
        )


def _read_only(arrays: tuple[Any, ...]) -> tuple[Any, ...]:
    """The arrays (or None), marked read-only: cached results that no caller may change."""
    for x in arrays:
        if isinstance(x, np.ndarray):
            x.setflags(write=False)
    return arrays


def random_cotangent(case: AttentionCase, seed: int) -> np.ndarray:
    """A standard-normal cotangent d_out of out's shape ``(*B, Hq, L, Ev)``, in the input dtype."""
    shape = (*case.logits_shape[:-1], case.value_dim)
    return np.asarray(np.random.default_rng(seed).standard_normal(shape)).astype(numpy_dtype(case.dtype))


def _converted(impl: Implementation, case: AttentionCase) -> dict[str, Any]:
    """q, k, v and the case's array keywords as ``impl``'s arrays."""
    return {name: None if x is None else impl.asarray(x)
            for name, x in (("q", case.q), ("k", case.k), ("v", case.v), *case.array_keywords().items())}


def call_vjp(impl: Implementation, case: AttentionCase, d_out: np.ndarray, **kwargs: Any) -> Gradients:
    """Run ``impl.attention_vjp`` on the case and the cotangent ``d_out`` (converted with
    ``impl.asarray``); returns NumPy gradients. ``kwargs`` override the case's options."""
    arrays = _converted(impl, case)
    result = impl.attention_vjp(arrays.pop("q"), arrays.pop("k"), arrays.pop("v"), impl.asarray(d_out), **arrays,
                                **{**case.scalar_keywords(), **kwargs})
    return Gradients(*(None if x is None else impl.to_numpy(x) for x in result))


def call(impl: Implementation, case: AttentionCase, **kwargs: Any) -> AttentionOutput:
    """Run ``impl.attention`` on the case converted with ``impl.asarray``; returns NumPy results.

    ``kwargs`` override the case's options and add flags (``return_weights``...). When the call
    returns a bare array it is wrapped as ``AttentionOutput(out, None, None)``.
    """
    arrays = _converted(impl, case)
    options = {**case.scalar_keywords(), **kwargs}
    result = impl.attention(arrays.pop("q"), arrays.pop("k"), arrays.pop("v"), **arrays, **options)
    if not isinstance(result, AttentionOutput):
        return AttentionOutput(impl.to_numpy(result))
    return AttentionOutput(*(None if x is None else impl.to_numpy(x) for x in result))


def full_results(impl: Implementation, case: AttentionCase, **kwargs: Any) -> AttentionOutput:
    """``call`` with out, weights and lse requested (``kwargs`` as for ``call``)."""
    return call(impl, case, return_weights=True, return_lse=True, **kwargs)
