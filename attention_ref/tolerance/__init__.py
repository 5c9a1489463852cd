"""The tolerance rules: how far a result may lie from the exact answer (SPEC.md rules 10 and 14).

``forward``: the bounds of out, weights and lse (rule 10, "Accuracy"), derived for implementations of
SPEC.md and calibrated for other people's kernels; ``gradients``: their extension, by the same
method, to dq, dk, dv and dbias (rule 14). Both modules document their derivation in full.

This package depends only on NumPy and the modules below it (``attention_ref.frameworks``,
``attention_ref.broadcasting``), never on ``attention_ref.testing`` or the backends.
"""

from __future__ import annotations

from .forward import (
    BASELINE_FACTOR,
    BASELINE_FACTOR_SOFTCAP,
    DIVISION_ERROR,
    SMALLEST_NORMAL,
    TRANSCENDENTAL_ERROR,
    UNIT_ROUNDOFF,
    ErrorBounds,
    calibrated_error_bounds,
    error_bounds,
    row_error,
    row_sizes,
    same_dtype_baseline,
    value_size,
)
from .gradients import (
    GRADIENT_BASELINE_FACTOR,
    GRADIENT_BASELINE_FACTOR_SOFTCAP,
    GradientBounds,
    GradientProblem,
    calibrated_gradient_bounds,
    gradient_error_bounds,
    same_dtype_baseline_gradients,
)

__all__ = [
    "BASELINE_FACTOR",
    "BASELINE_FACTOR_SOFTCAP",
    "DIVISION_ERROR",
    "GRADIENT_BASELINE_FACTOR",
    "GRADIENT_BASELINE_FACTOR_SOFTCAP",
    "SMALLEST_NORMAL",
    "TRANSCENDENTAL_ERROR",
    "UNIT_ROUNDOFF",
    "ErrorBounds",
    "GradientBounds",
    "GradientProblem",
    "calibrated_error_bounds",
    "calibrated_gradient_bounds",
    "error_bounds",
    "gradient_error_bounds",
    "row_error",
    "row_sizes",
    "same_dtype_baseline",
    "same_dtype_baseline_gradients",
    "value_size",
]
