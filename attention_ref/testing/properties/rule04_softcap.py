"""rule 4: softcap: ``x = c tanh(x / c)`` after the scale and before the bias, so every capped logit
lies in [-c, c]."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import strategies as st

from ..assertions import assert_within, bounds_for
from ..cases import AttentionCase, full_results
from ..implementation import Subject
from ..runner import attention_property


@attention_property("softcap_bounds_weight_ratios", (4,),
                    cases=dict(softcap=False, bias=False, qk_magnitudes=(3.0, 10.0)),
                    extra=(st.floats(0.05, 4.0),), requires=("softcap", "weights"))
def softcap_bounds_weight_ratios(subject: Subject, example: tuple[AttentionCase, float]) -> None:
    """With softcap c (and no bias) every attended key gets weight >= exp(-2c) / (attended keys),
    however large the logits."""
    case, cap = example
    case = case.replace(softcap=cap)
    result = full_results(subject.impl, case)
    allowed = case.allowed()
    counts = allowed.sum(axis=-1, keepdims=True)
    floor = np.where(allowed, math.exp(-2 * cap) / np.maximum(counts, 1), 0.0)
    weights = np.asarray(result.weights, np.float64)
    assert_within("attended weights vs exp(-2c)/n", np.minimum(weights, floor), floor,
                  bounds_for(subject, case).weights, case)
