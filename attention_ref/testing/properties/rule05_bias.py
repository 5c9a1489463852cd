"""rule 5: bias: added to the logits after the softcap, so adding the same finite constant to every
entry of a row changes neither out nor weights."""

from __future__ import annotations

import numpy as np

from ...tolerance import UNIT_ROUNDOFF
from ..assertions import assert_within, bounds_for
from ..cases import AttentionCase, full_results
from ..implementation import Subject
from ..runner import attention_property
from ._common import SEEDS


@attention_property("bias_row_constant_changes_nothing", (5,), cases=dict(bias=True), extra=(SEEDS,))
def bias_row_constant_changes_nothing(subject: Subject, example: tuple[AttentionCase, int]) -> None:
    """Adding a constant to each row of the bias changes neither out nor weights."""
    case, seed = example
    shifts = np.random.default_rng(seed).uniform(-8, 8, (*case.logits_shape[:-1], 1))
    shifted_bias = (np.asarray(case.bias, np.float64) + shifts).astype(case.bias.dtype)
    shifted = case.replace(bias=shifted_bias)
    allowed = case.allowed()
    # Rounding the shifted bias back to its dtype perturbs each logit by up to u·|bias|.
    rounding = UNIT_ROUNDOFF[case.bias.dtype.name] * np.where(
        allowed & np.isfinite(shifted_bias.astype(np.float64)), np.abs(shifted_bias.astype(np.float64)), 0
    ).max(axis=-1, initial=0.0)
    bound_first, bound_second = bounds_for(subject, case), bounds_for(subject, shifted, extra_logit_error=rounding)
    first, second = full_results(subject.impl, case), full_results(subject.impl, shifted)
    for name in ("out", "weights"):
        if getattr(first, name) is not None:
            assert_within(f"bias shifted per row: {name}", getattr(second, name), getattr(first, name),
                          getattr(bound_first, name) + getattr(bound_second, name), case)
