"""rule 13: dropout: with an explicit keep-mask the probabilities are multiplied by
``keep / (1 - dropout_p)`` before P·V; the returned weights are those before dropout and lse is
unchanged."""

from __future__ import annotations

import numpy as np

from ..assertions import assert_same_results, assert_within, bounds_for
from ..cases import AttentionCase, full_results
from ..implementation import Subject
from ..runner import attention_property


@attention_property("dropout_equals_manual_computation", (13,), cases=dict(dropout=True), requires=("dropout",))
def dropout_equals_manual_computation(subject: Subject, case: AttentionCase) -> None:
    """With dropout_p and a keep-mask, out equals (P · keep / (1 - p)) · v, with P the weights of the
    call without dropout (computed here in float64), and the returned weights are P (before dropout)."""
    result = full_results(subject.impl, case)
    plain = case.replace(dropout_p=0.0, dropout_mask=None).oracle()
    _, v = case.repeated_kv()
    keep = np.broadcast_to(case.dropout_mask, case.logits_shape)
    manual = np.matmul(np.where(keep, np.asarray(plain.weights) / (1.0 - case.dropout_p), 0.0),
                       np.asarray(v, np.float64))
    bounds = bounds_for(subject, case)
    assert_within("out vs manual dropout", result.out, manual, bounds.out, case)
    if result.weights is not None:
        assert_within("weights (before dropout)", result.weights, plain.weights, bounds.weights, case,
                      exact=~case.allowed(), derivation=bounds.derivation)


@attention_property("dropout_all_keep_scales_by_inverse_keep_probability", (13,), cases=dict(dropout=True),
                    requires=("dropout",))
def dropout_all_keep_scales_by_inverse_keep_probability(subject: Subject, case: AttentionCase) -> None:
    """An all-keep mask with dropout_p = p gives out / (1 - p) of the call without dropout (so with
    p = 0 it equals no dropout), and the same weights and lse."""
    all_keep = case.replace(dropout_mask=np.ones(case.dropout_mask.shape, bool))
    plain = case.replace(dropout_p=0.0, dropout_mask=None)
    kept, none = full_results(subject.impl, all_keep), full_results(subject.impl, plain)
    factor = 1.0 / (1.0 - case.dropout_p)
    bound_kept, bound_none = bounds_for(subject, all_keep), bounds_for(subject, plain)
    assert_within("out with an all-keep mask vs out / (1 - p)", kept.out, np.asarray(none.out, np.float64) * factor,
                  bound_kept.out + factor * bound_none.out, case)
    assert_same_results(kept._replace(out=None), none._replace(out=None), bound_kept + bound_none, case,
                        "all-keep dropout vs none")
