"""rule 8: excluded keys and fully excluded rows: excluded keys (mask False, causal, window, -inf
bias) get weight exactly 0 and their k and v change nothing; a fully excluded row (S = 0 included)
has out 0, weights 0 and lse -inf; nothing is NaN. Rows of weights sum to 1 and out stays within the
attended values (rule 11).

PYTEST_DONT_REWRITE: pytest rewrites the asserts of a plugin's distribution (the ``pytest11``
entry point makes this package one); this module's assertion messages are reported as written.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from hypothesis import strategies as st

from ...tolerance import UNIT_ROUNDOFF
from ..assertions import assert_finite, assert_matches_oracle, assert_same_results, assert_within, bounds_for
from ..cases import AttentionCase, full_results
from ..implementation import Subject
from ..runner import CheckerError, attention_property
from ..strategies import Features, feature_cases, numpy_dtype
from ._common import SEEDS, broadcast_full, with_new_kv


@attention_property("weights_rows_sum_to_one", (8, 11), cases={}, requires=("weights",))
def weights_rows_sum_to_one(subject: Subject, case: AttentionCase) -> None:
    """Each row of weights sums to 1, or is all 0 when the row is fully excluded."""
    result = full_results(subject.impl, case)
    bounds = bounds_for(subject, case)
    attended = np.asarray(case.allowed().any(axis=-1))
    sums = np.asarray(result.weights, np.float64).sum(axis=-1)
    bound = bounds.weights.sum(axis=-1) + case.kv_len * UNIT_ROUNDOFF["float64"]
    assert_within("sum of weights", sums, attended.astype(np.float64), bound, case, exact=~attended)


@attention_property("excluded_keys_get_zero_weight", (8,), cases={}, extra=(SEEDS,), requires=("mask",))
def excluded_keys_get_zero_weight(subject: Subject, example: tuple[AttentionCase, int]) -> None:
    """Excluded keys get weight exactly 0, and changing their k and v changes nothing."""
    case, seed = example
    rng = np.random.default_rng(seed)
    hidden = rng.random(case.kv_len) < 0.5
    mask = broadcast_full(case.mask, case.logits_shape, True, bool)
    mask[..., hidden] = False
    case = case.replace(mask=mask)
    result = full_results(subject.impl, case)
    allowed = case.allowed()
    if result.weights is not None:
        assert_within("weights of excluded keys", np.where(allowed, 0, result.weights),
                      np.zeros(allowed.shape), 0.0, case, exact=np.ones(allowed.shape, bool))
    changed = with_new_kv(case, hidden, rng)
    assert_same_results(full_results(subject.impl, changed), result, None, changed, "after changing excluded k/v")


@attention_property("output_within_attended_values", (8, 11), cases={})
def output_within_attended_values(subject: Subject, case: AttentionCase) -> None:
    """Each output lies within the range of the attended v rows (per channel); fully excluded rows are 0.
    With dropout, within that range widened to include 0, times 1 / (1 - p) (kept weights sum to <= 1)."""
    result = full_results(subject.impl, case)
    bounds = bounds_for(subject, case)
    allowed = case.allowed()[..., None]
    _, v = case.repeated_kv()
    v64 = np.asarray(v, np.float64)[..., None, :, :]
    low = np.where(allowed, v64, np.inf).min(axis=-2, initial=np.inf)
    high = np.where(allowed, v64, -np.inf).max(axis=-2, initial=-np.inf)
    if case.dropout_mask is not None:
        factor = 1.0 / (1.0 - case.dropout_p)
        low, high = factor * np.minimum(low, 0.0), factor * np.maximum(high, 0.0)
    out = np.asarray(result.out, np.float64)
    fully_excluded = ~np.asarray(allowed.any(axis=-2))
    clipped = np.where(fully_excluded, 0.0, np.clip(out, low, high))
    assert_within("out vs range of attended v", out, clipped, bounds.out, case,
                  exact=np.broadcast_to(fully_excluded, out.shape))


def _fully_excluded_examples(features: Features) -> st.SearchStrategy[Any]:
    mechanisms = [m for m, needs in (("mask_row", ("mask",)), ("bias_row", ("bias",)),
                                     ("bottom_right_causal", ("causal", "bottom_right")), ("no_keys", ()))
                  if all(n in features for n in needs)]
    cases = feature_cases(features, min_q_len=1)
    long_queries = feature_cases(features, min_q_len=4, max_kv_len=3, long_kv_len=None)  # L > S
    assert cases is not None and long_queries is not None  # no feature is forced on
    return st.tuples(st.sampled_from(mechanisms), cases, long_queries, SEEDS)


@attention_property("fully_excluded_rows_are_zero", (1, 8), strategy=_fully_excluded_examples)
def fully_excluded_rows_are_zero(subject: Subject, example: tuple[str, AttentionCase, AttentionCase, int]) -> None:
    """Rows excluded by mask, -inf bias, bottom-right causal (L > S) or S = 0 give out 0, weights 0,
    lse -inf; nothing is NaN."""
    mechanism, case, long_query_case, seed = example
    rng = np.random.default_rng(seed)
    rows = rng.random(case.q_len) < 0.5
    rows[rng.integers(case.q_len)] = True
    if mechanism == "mask_row":
        mask = broadcast_full(case.mask, case.logits_shape, True, bool)
        mask[..., rows, :] = False
        case = case.replace(mask=mask)
    elif mechanism == "bias_row":
        bias = broadcast_full(case.bias, case.logits_shape, 0.0, numpy_dtype(case.dtype))
        bias[..., rows, :] = -np.inf
        case = case.replace(bias=bias)
    elif mechanism == "bottom_right_causal":
        case = long_query_case.replace(causal=True, alignment="bottom_right")
    else:
        def without_keys(x: np.ndarray | None) -> np.ndarray | None:
            return x if x is None or x.ndim == 0 or x.shape[-1] == 1 else x[..., :0]

        case = case.replace(k=case.k[..., :0, :], v=case.v[..., :0, :], mask=without_keys(case.mask),
                            bias=without_keys(case.bias), dropout_mask=without_keys(case.dropout_mask))
    fully_excluded = ~case.allowed().any(axis=-1)
    if not (fully_excluded.any() or case.q.size == 0 or math.prod(case.logits_shape[:-2]) == 0):
        raise CheckerError(f"the {mechanism} mechanism left no row fully excluded\n  case: {case!r}")
    result = full_results(subject.impl, case)
    assert_finite("fully excluded rows", result, case)
    assert_matches_oracle(subject, case, result)


@attention_property("neg_inf_bias_equals_mask", (5, 8), cases=dict(bias=True, neg_inf_bias=True), requires=("mask",))
def neg_inf_bias_equals_mask(subject: Subject, case: AttentionCase) -> None:
    """A -inf bias entry excludes its key exactly as a False mask entry does."""
    bias64 = np.broadcast_to(np.asarray(case.bias, np.float64), case.logits_shape)
    mask = broadcast_full(case.mask, case.logits_shape, True, bool) & (bias64 != -np.inf)
    masked = case.replace(mask=mask, bias=np.where(bias64 == -np.inf, 0.0, bias64).astype(case.bias.dtype))
    bound = 2 * bounds_for(subject, case)
    assert_same_results(full_results(subject.impl, case), full_results(subject.impl, masked), bound, case,
                        "-inf bias vs mask")
