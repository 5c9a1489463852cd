"""rule 7: causal and sliding windows: ``causal=True`` and ``window=(left, right)``, at either
alignment, equal the explicit mask of their pattern, and keys a query cannot see change nothing.
(Their gradients are compared too; ``gradients_match_float64_oracle`` of rule 14 covers them as well.)"""

from __future__ import annotations

import numpy as np

from ..assertions import (
    assert_same_gradients,
    assert_same_results,
    assert_within,
    bounds_for,
    gradient_bounds_for,
)
from ..cases import AttentionCase, call_vjp, full_results, random_cotangent
from ..implementation import Subject
from ..runner import attention_property
from ._common import SEEDS, with_new_kv


@attention_property("causal_equals_explicit_mask", (7,), cases=dict(causal=True), requires=("mask",))
def causal_equals_explicit_mask(subject: Subject, case: AttentionCase) -> None:
    """causal=True (either alignment) equals the explicit mask j <= i (+ S - L for bottom_right)."""
    assert_same_results(full_results(subject.impl, case), full_results(subject.impl, case.with_positions_as_mask()),
                        2 * bounds_for(subject, case), case, f"causal {case.alignment} vs explicit mask")


@attention_property("causal_ignores_future_keys", (7,), cases=dict(causal=True), extra=(SEEDS,))
def causal_ignores_future_keys(subject: Subject, example: tuple[AttentionCase, int]) -> None:
    """Under causal, changing the k and v of keys a query cannot see leaves its results unchanged."""
    case, seed = example
    rng = np.random.default_rng(seed)
    cut = int(rng.integers(0, case.kv_len + 1))
    offset = 0 if case.alignment == "top_left" else case.kv_len - case.q_len
    rows = np.arange(case.q_len) + offset < cut  # these rows see no key >= cut
    changed = with_new_kv(case, np.arange(case.kv_len) >= cut, rng)
    first, second = full_results(subject.impl, case), full_results(subject.impl, changed)
    for name, x, y in (("out", first.out, second.out), ("weights", first.weights, second.weights),
                       ("lse", None if first.lse is None else first.lse[..., None],
                        None if second.lse is None else second.lse[..., None])):
        if x is None or y is None:
            continue
        assert_within(f"rows before key {cut}: {name}", y[..., rows, :], x[..., rows, :], 0.0, case,
                      exact=np.ones(x[..., rows, :].shape, bool))


@attention_property("window_equals_explicit_mask", (7,), cases=dict(window=True), requires=("window", "mask"))
def window_equals_explicit_mask(subject: Subject, case: AttentionCase) -> None:
    """window=(left, right) (with causal, either alignment) equals the explicit mask
    i + offset - left <= j <= i + offset + right."""
    explicit = case.with_positions_as_mask()
    assert_same_results(full_results(subject.impl, case), full_results(subject.impl, explicit),
                        2 * bounds_for(subject, case), case,
                        f"window {case.window} ({case.alignment}, causal={case.causal}) vs explicit mask")
    if "grad" in subject.features:
        d_out = random_cotangent(case, case.q_len * 7 + case.kv_len)
        first, second = call_vjp(subject.impl, case, d_out), call_vjp(subject.impl, explicit, d_out)
        assert_same_gradients(first, second, 2 * gradient_bounds_for(subject, case, d_out), case,
                              "window vs explicit mask")
