"""rule 3: scale: ``scale=None`` is 1/sqrt(E), an explicit scale multiplies the dot products as
given (zero and negative values included), and a large scale selects the extreme key."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

from ..assertions import assert_matches_oracle, assert_same_results, assert_within, bounds_for
from ..cases import AttentionCase, call, full_results
from ..implementation import Subject
from ..runner import attention_property
from ..strategies import Features, feature_cases


def _distinct_head_dims(features: Features) -> st.SearchStrategy[Any] | None:
    """Cases with E != Ev where the implementation allows them (else E = Ev)."""
    cases = feature_cases(features, scale=False, rank2=False, min_value_dim=1)
    if cases is None or "value_dim" not in features:
        return cases
    return cases.filter(lambda c: c.head_dim != c.value_dim)


@attention_property("default_scale_is_inverse_sqrt_head_dim", (3,), strategy=_distinct_head_dims)
def default_scale_is_inverse_sqrt_head_dim(subject: Subject, case: AttentionCase) -> None:
    """scale=None gives the oracle's result for an explicit scale of 1/sqrt(E) (E != Ev where allowed)."""
    explicit = case.replace(scale=1.0 / math.sqrt(case.head_dim))
    assert_matches_oracle(subject, explicit, full_results(subject.impl, case))


@attention_property("zero_scale_averages_attended_values", (3, 8), cases=dict(bias=False), requires=("scale",))
def zero_scale_averages_attended_values(subject: Subject, case: AttentionCase) -> None:
    """scale=0 gives the plain mean of the attended v rows (each times its dropout multiplier)."""
    case = case.replace(scale=0.0)
    result = full_results(subject.impl, case)
    allowed = case.allowed()
    _, v = case.repeated_kv()
    counts = allowed.sum(axis=-1, keepdims=True)
    mean = np.matmul(allowed / np.maximum(counts, 1) * case.dropout_multiplier(), np.asarray(v, np.float64))
    assert_within("out", result.out, mean, bounds_for(subject, case).out, case, exact=(counts == 0))


@attention_property("scale_is_homogeneous", (3,), cases={}, extra=(st.sampled_from((2.0, 4.0, -1.0, -2.0)),),
                    requires=("scale",))
def scale_is_homogeneous(subject: Subject, example: tuple[AttentionCase, float]) -> None:
    """attention(c·q, k, scale=s) equals attention(q, k, scale=c·s)."""
    case, factor = example
    scaled_q = np.asarray(case.q, np.float64) * factor
    rounded_q = scaled_q.astype(case.q.dtype)
    assume(np.array_equal(rounded_q.astype(np.float64), scaled_q))  # c·q exact in the dtype
    scale = case.resolved_scale
    first = case.replace(q=rounded_q, scale=scale)
    second = case.replace(scale=factor * scale)
    assert_same_results(full_results(subject.impl, first), full_results(subject.impl, second),
                        2 * bounds_for(subject, second), second, f"q scaled by {factor}")


@attention_property("large_scale_selects_extreme_key", (3, 9), cases=dict(bias=False, softcap=False, dropout=False),
                    extra=(st.booleans(),), requires=("scale",))
def large_scale_selects_extreme_key(subject: Subject, example: tuple[AttentionCase, bool]) -> None:
    """A large positive scale tends to the argmax key's v (negative: the argmin key's)."""
    case, negative = example
    k, v = case.repeated_kv()
    dots = np.matmul(np.asarray(case.q, np.float64), np.swapaxes(np.asarray(k, np.float64), -1, -2))
    dots = -dots if negative else dots
    allowed = case.with_positions_as_mask().replace(scale=1.0).allowed()
    ranked = np.sort(np.where(allowed, dots, -np.inf), axis=-1)
    attended = allowed.sum(axis=-1)
    sizes = np.matmul(np.abs(np.asarray(case.q, np.float64)), np.swapaxes(np.abs(np.asarray(k, np.float64)), -1, -2))
    size = np.where(allowed, sizes, 0).max(axis=-1, initial=0.0)
    gap = np.full(attended.shape, np.inf)
    if case.kv_len >= 2:
        with np.errstate(invalid="ignore"):
            gap = np.where(attended >= 2, ranked[..., -1] - ranked[..., -2], gap)
    # Rows whose extreme key is unique by a margin that float32 logits resolve.
    checked = (attended >= 1) & (gap > 0) & (gap >= 1e-3 * size)
    assume(checked.any())
    min_gap = np.where(checked & np.isfinite(gap), gap, np.inf).min(initial=np.inf)
    # With scale = margin / min_gap, every other attended key trails the extreme one by at least
    # `margin` in exact logits. The logit error delta of attention_ref.tolerance is at most
    # (E + 1) u |scale| size <= 9 * 2**-24 * 64e3 < 0.04 (gap >= 1e-3 size, E <= 8) in float32, so the
    # computed logits trail by more than margin / 2, each other weight is below exp(-margin / 2),
    # and out differs from the extreme key's v by at most 2 S exp(-margin / 2) max|v|.
    margin = 64.0
    scale = margin / min_gap if np.isfinite(min_gap) else 1.0
    case = case.replace(scale=-scale if negative else scale)
    result = call(subject.impl, case)
    chosen = np.take_along_axis(np.asarray(v, np.float64),
                                np.argmax(np.where(allowed, dots, -np.inf), axis=-1)[..., None], axis=-2)
    value_size = np.abs(np.asarray(v, np.float64)).max(axis=-2, keepdims=True, initial=0.0)
    bound = bounds_for(subject, case).out + 2 * case.kv_len * math.exp(-margin / 2) * value_size
    assert_within("out vs the extreme key's v", np.where(checked[..., None], result.out, 0),
                  np.where(checked[..., None], chosen, 0), bound, case)
