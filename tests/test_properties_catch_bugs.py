"""The properties are not vacuous: each deliberately buggy backend fails at least one of them,
and the property meant for its bug in particular."""

from __future__ import annotations

import pytest

from attention_ref.testing import get_property, run_property

from .buggy_backends import (
    AlwaysTopLeft,
    CausalOffByOne,
    Float64ComputedInFloat32,
    GqaTileOrder,
    MeanOfValuesOnFullyMaskedRows,
    NoMaxSubtraction,
    ScaleFromValueDim,
)

EXPECTED_CATCHES = [
    (ScaleFromValueDim, "matches_float64_oracle"),
    (AlwaysTopLeft, "causal_equals_explicit_mask"),
    (GqaTileOrder, "gqa_equals_repeated_kv_heads"),
    (MeanOfValuesOnFullyMaskedRows, "fully_excluded_rows_are_zero"),
    (Float64ComputedInFloat32, "matches_float64_oracle"),
    (NoMaxSubtraction, "huge_logits_stay_finite"),
    (CausalOffByOne, "causal_ignores_future_keys"),
    (CausalOffByOne, "matches_float64_oracle"),
]


@pytest.mark.parametrize(("buggy", "property_name"), EXPECTED_CATCHES,
                         ids=[f"{b.name}-{p}" for b, p in EXPECTED_CATCHES])
def test_property_catches_the_bug(buggy: type, property_name: str) -> None:
    with pytest.raises(Exception) as info:  # noqa: PT011 - Hypothesis may group several failures
        run_property(get_property(property_name), buggy())
    assert "AssertionError" in repr(info.value) or isinstance(info.value, AssertionError), info.value
