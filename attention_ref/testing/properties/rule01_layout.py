"""rule 1: layout: every batch element and head is computed independently, so permuting the keys or
the queries permutes nothing else, and batch dims equal a loop over them."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st

from ...result import AttentionOutput
from ..assertions import assert_same_results, assert_within, bounds_for
from ..cases import AttentionCase, full_results
from ..implementation import Subject
from ..runner import attention_property
from ..strategies import Features, feature_cases
from ._common import SEEDS


def _permute(x: np.ndarray | None, perm: np.ndarray, axis: int) -> np.ndarray | None:
    if x is None or x.ndim < -axis or x.shape[axis] == 1:
        return x
    return np.take(x, perm, axis=axis)


def _causal_only_with_mask(features: Features) -> st.SearchStrategy[Any] | None:
    """Cases whose causal and window pattern can be replaced by the explicit mask (needs mask support:
    without it, no causal and no window)."""
    cases = feature_cases(features, **({} if "mask" in features else {"causal": False, "window": False}))
    return None if cases is None else st.tuples(cases, SEEDS)


@attention_property("key_permutation_invariance", (1, 8), strategy=_causal_only_with_mask)
def key_permutation_invariance(subject: Subject, example: tuple[AttentionCase, int]) -> None:
    """Permuting the keys (k, v and the key axis of mask and bias) changes nothing but the weights' order."""
    case, seed = example
    case = case.with_positions_as_mask()
    perm = np.random.default_rng(seed).permutation(case.kv_len)
    permuted = case.replace(k=np.take(case.k, perm, axis=-2), v=np.take(case.v, perm, axis=-2),
                            mask=_permute(case.mask, perm, -1), bias=_permute(case.bias, perm, -1),
                            dropout_mask=_permute(case.dropout_mask, perm, -1))
    first, second = full_results(subject.impl, case), full_results(subject.impl, permuted)
    if second.weights is not None:
        second = second._replace(weights=np.take(second.weights, np.argsort(perm), axis=-1))
    assert_same_results(first, second, 2 * bounds_for(subject, case), case, "keys permuted")


@attention_property("query_permutation_equivariance", (1,), strategy=_causal_only_with_mask)
def query_permutation_equivariance(subject: Subject, example: tuple[AttentionCase, int]) -> None:
    """Permuting the queries (q and the query axis of mask and bias) permutes the results the same way."""
    case, seed = example
    case = case.with_positions_as_mask()
    perm = np.random.default_rng(seed).permutation(case.q_len)
    permuted = case.replace(q=np.take(case.q, perm, axis=-2), mask=_permute(case.mask, perm, -2),
                            bias=_permute(case.bias, perm, -2), dropout_mask=_permute(case.dropout_mask, perm, -2))
    first, second = full_results(subject.impl, case), full_results(subject.impl, permuted)
    inverse = np.argsort(perm)
    second = AttentionOutput(*(None if x is None else np.take(x, inverse, axis=axis)
                               for x, axis in zip(second, (-2, -2, -1), strict=True)))
    assert_same_results(first, second, 2 * bounds_for(subject, case), case, "queries permuted")


@attention_property("batch_dims_equal_a_loop", (1,), cases=dict(min_batch_dims=1))
def batch_dims_equal_a_loop(subject: Subject, case: AttentionCase) -> None:
    """Extra leading batch dims give the same results as a loop over them."""
    full = full_results(subject.impl, case)
    bounds = 2 * bounds_for(subject, case)
    full_shape = {name: None if x is None else np.broadcast_to(x, case.logits_shape)
                  for name, x in (("mask", case.mask), ("bias", case.bias), ("dropout_mask", case.dropout_mask))}
    for index in np.ndindex(*case.batch_shape):
        keep = tuple(slice(i, i + 1) for i in index)  # one batch element, batch dims kept
        part = case.replace(q=case.q[keep], k=case.k[keep], v=case.v[keep],
                            **{name: None if x is None else x[keep] for name, x in full_shape.items()})
        result = full_results(subject.impl, part)
        for name in ("out", "weights", "lse"):
            if getattr(result, name) is not None:
                assert_within(f"batch {index}: {name}", getattr(result, name), getattr(full, name)[keep],
                              getattr(bounds, name)[keep], part)
