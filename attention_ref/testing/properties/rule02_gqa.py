"""rule 2: grouped-query attention: query head h uses kv head h // (Hq // Hkv), the kv heads repeated
in repeat_interleave order."""

from __future__ import annotations

from ..assertions import assert_same_results, bounds_for
from ..cases import AttentionCase, full_results
from ..implementation import Subject
from ..runner import attention_property


@attention_property("gqa_equals_repeated_kv_heads", (2,), cases=dict(gqa=True))
def gqa_equals_repeated_kv_heads(subject: Subject, case: AttentionCase) -> None:
    """Hq > Hkv equals repeating each kv head Hq/Hkv times (repeat_interleave order)."""
    k, v = case.repeated_kv()
    repeated = case.replace(k=k, v=v)
    assert_same_results(full_results(subject.impl, case), full_results(subject.impl, repeated),
                        2 * bounds_for(subject, case), case, "GQA vs repeated kv heads")
