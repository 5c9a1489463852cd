"""rule 14: gradients: ``attention_vjp`` matches the float64 oracle's analytic backward pass (under
every feature: windows of rule 7 and dropout of rule 13 included) and central finite differences;
excluded keys and fully excluded rows give exactly zero gradient (rule 8); dbias, the logits'
gradient, sums to 0 over each row (rule 5).

PYTEST_DONT_REWRITE: pytest rewrites the asserts of a plugin's distribution (the ``pytest11``
entry point makes this package one); this module's assertion messages are reported as written.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st

from ...tolerance import UNIT_ROUNDOFF
from ..assertions import GRADIENT_NAMES, assert_gradients_close, assert_within, gradient_bounds_for
from ..cases import AttentionCase, call_vjp, random_cotangent
from ..finite_differences import directional_derivatives
from ..implementation import Subject
from ..runner import attention_property
from ..strategies import Features, feature_cases
from ._common import SEEDS, broadcast_full


@attention_property("gradients_match_float64_oracle", (7, 13, 14), cases={}, extra=(SEEDS,), requires=("grad",))
def gradients_match_float64_oracle(subject: Subject, example: tuple[AttentionCase, int]) -> None:
    """dq, dk, dv and dbias match the float64 oracle's analytic backward pass within the gradient
    tolerance (every feature, every dtype); exactly 0 where SPEC.md fixes them; never NaN."""
    case, seed = example
    d_out = random_cotangent(case, seed)
    assert_gradients_close(call_vjp(subject.impl, case, d_out), case, d_out, calibrated=subject.calibrated,
                           with_dbias="dbias" in subject.features)


@attention_property("gradients_vanish_through_excluded_keys", (8, 14),
                    cases=dict(mask=True, fully_masked_rows=True), extra=(SEEDS,), requires=("grad", "mask"))
def gradients_vanish_through_excluded_keys(subject: Subject, example: tuple[AttentionCase, int]) -> None:
    """Keys no query attends get dk = dv = 0 exactly, fully excluded rows dq = 0 exactly, excluded
    bias entries dbias = 0 exactly; nothing is NaN (masks with fully masked rows and hidden keys)."""
    case, seed = example
    rng = np.random.default_rng(seed)
    mask = broadcast_full(case.mask, case.logits_shape, True, bool)
    mask[..., rng.random(case.kv_len) < 0.4] = False
    case = case.replace(mask=mask)
    d_out = random_cotangent(case, seed)
    grads = call_vjp(subject.impl, case, d_out)
    zeros = case.structural_zero_gradients()
    for name in GRADIENT_NAMES:
        got, fixed = getattr(grads, name), getattr(zeros, name)
        if fixed is None or got is None:  # no bias, or a kernel without dbias
            continue
        got = np.asarray(got, np.float64)
        assert not np.isnan(got).any(), f"{name} has NaN at {np.argwhere(np.isnan(got))[:3].tolist()}\n  case: {case!r}"
        assert_within(f"{name} where SPEC.md fixes 0", np.where(fixed, got, 0.0), np.zeros(got.shape), 0.0, case,
                      exact=np.ones(got.shape, bool))


@attention_property("logit_gradient_rows_sum_to_zero", (5, 14), cases=dict(bias=True), extra=(SEEDS,),
                    requires=("grad", "bias", "dbias"))
def logit_gradient_rows_sum_to_zero(subject: Subject, example: tuple[AttentionCase, int]) -> None:
    """With a bias of the full logits shape, dbias (the logits' gradient) sums to 0 over the keys of
    every row (softmax is invariant to a constant per row)."""
    case, seed = example
    case = case.replace(bias=np.ascontiguousarray(np.broadcast_to(case.bias, case.logits_shape)))
    d_out = random_cotangent(case, seed)
    grads = call_vjp(subject.impl, case, d_out)
    dbias = np.asarray(grads.dbias, np.float64)
    bounds = gradient_bounds_for(subject, case, d_out).dbias
    assert bounds is not None  # the case has a bias
    bound = bounds.sum(axis=-1)
    sums = dbias.sum(axis=-1)
    assert_within("sum over keys of dbias", sums, np.zeros(sums.shape),
                  bound + case.kv_len * UNIT_ROUNDOFF["float64"] * np.abs(dbias).sum(axis=-1), case)


def _float64_cases(features: Features) -> st.SearchStrategy[Any] | None:
    if "float64" not in features.dtypes:
        return None
    cases = feature_cases(Features(features.supports, ("float64",), features.few_shapes))
    return None if cases is None else st.tuples(cases, SEEDS)


@attention_property("gradients_match_finite_differences", (14,), strategy=_float64_cases, requires=("grad",))
def gradients_match_finite_differences(subject: Subject, example: tuple[AttentionCase, int]) -> None:
    """float64 gradients match central finite differences of sum(out · d_out) along a random direction
    of (q, k, v, bias), Richardson-extrapolated, within a tolerance derived from the estimates
    themselves (``attention_ref.testing.finite_differences``)."""
    case, seed = example
    analytic, extrapolated, tolerance = directional_derivatives(subject, case, seed)
    assert abs(analytic - extrapolated) <= tolerance, (
        f"directional derivative: gradients give {analytic!r}, finite differences {extrapolated!r}; "
        f"|difference| {abs(analytic - extrapolated):.3g} > tolerance {tolerance:.3g}\n  case: {case!r}")
