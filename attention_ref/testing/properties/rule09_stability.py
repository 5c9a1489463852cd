"""rule 9: numerically stable softmax: the row max over the attended keys is subtracted before exp,
so logits of magnitude 1e4 give finite results within the accuracy of rule 10."""

from __future__ import annotations

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

from ..assertions import assert_finite, assert_matches_oracle
from ..cases import AttentionCase, full_results
from ..implementation import Subject
from ..runner import attention_property


@attention_property("huge_logits_stay_finite", (9,), cases=dict(softcap=False, bias=False, min_kv_len=1, min_q_len=1),
                    extra=(st.booleans(),), requires=("scale",))
def huge_logits_stay_finite(subject: Subject, example: tuple[AttentionCase, bool]) -> None:
    """Logits of magnitude 1e4 give finite results that match the oracle."""
    case, negative = example
    k, _ = case.repeated_kv()
    dots = np.abs(np.matmul(np.asarray(case.q, np.float64), np.swapaxes(np.asarray(k, np.float64), -1, -2)))
    largest = dots.max(initial=0.0)
    assume(largest > 0)
    case = case.replace(scale=(-1e4 if negative else 1e4) / largest)
    result = full_results(subject.impl, case)
    assert_finite("huge logits", result, case)
    assert_matches_oracle(subject, case, result)
