"""The float64 oracle (NumPy backend) equals a literal transcription of SPEC.md (rules 1-8, 11)."""

from __future__ import annotations

from hypothesis import given

from attention_ref.testing import AttentionCase, attention_cases
from attention_ref.testing.properties import assert_within

from .spec_transcription import transcribed_attention


@given(attention_cases(max_kv_len=7, max_q_len=7))
def test_oracle_equals_spec_transcription(case: AttentionCase) -> None:
    oracle = case.oracle()
    bounds = case.bounds(compute_dtype="float64", out_dtype="float64", oracle=oracle)
    out, weights, lse = transcribed_attention(case)
    allowed = case.allowed()
    fully_excluded = ~allowed.any(axis=-1)
    assert_within("out", oracle.out, out, bounds.out, case, exact=fully_excluded[..., None])
    assert_within("weights", oracle.weights, weights, bounds.weights, case, exact=~allowed)
    assert_within("lse", oracle.lse, lse, bounds.lse, case, exact=fully_excluded)
