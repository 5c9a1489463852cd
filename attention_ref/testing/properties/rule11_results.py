"""rule 11: results: weights are the probabilities (before dropout) and lse the log-sum-exp of the
final logits, so ``out = (weights · keep / (1 - p)) · v`` and ``weights = exp(logits - lse)``."""

from __future__ import annotations

import numpy as np

from ..assertions import assert_within, bounds_for
from ..cases import AttentionCase, full_results
from ..implementation import Subject
from ..runner import attention_property


@attention_property("weights_and_lse_agree_with_output", (11,), cases={}, requires=("weights", "lse"))
def weights_and_lse_agree_with_output(subject: Subject, case: AttentionCase) -> None:
    """out = (weights · dropout multiplier) · v, and weights = exp(logits - lse) on attended keys
    (the returned weights are those before dropout)."""
    result = full_results(subject.impl, case)
    oracle = case.oracle()
    bounds = bounds_for(subject, case, oracle=oracle)
    _, v = case.repeated_kv()
    v64 = np.asarray(v, np.float64)
    weights = np.asarray(result.weights, np.float64)
    multiplier = case.dropout_multiplier()
    assert_within("out vs (weights · keep / (1 - p)) · v", result.out, np.matmul(weights * multiplier, v64),
                  bounds.out + np.matmul(bounds.weights * multiplier, np.abs(v64)), case)
    allowed = case.allowed()
    lse = np.asarray(result.lse, np.float64)[..., None]
    with np.errstate(invalid="ignore", over="ignore"):
        from_lse = np.where(allowed, np.exp(case.logits() - np.where(np.isfinite(lse), lse, 0)), 0.0)
    bound = bounds.weights + np.asarray(oracle.weights) * np.expm1(bounds.lse[..., None])
    assert_within("weights vs exp(logits - lse)", weights, from_lse, bound, case, exact=~allowed)
