"""Every backend equals a literal transcription of SPEC.md (rules 1-8, 11, 13): an oracle independent
of the NumPy backend, so that the float64 oracle is itself checked."""

from __future__ import annotations

import pytest
from hypothesis import given

import attention_ref as ar
from attention_ref.result import AttentionOutput
from attention_ref.testing import AttentionCase, attention_cases, call
from attention_ref.testing.assertions import assert_matches

from .conftest import BACKENDS
from .spec_transcription import transcribed_attention


@pytest.mark.parametrize("backend_name", BACKENDS)
@given(case=attention_cases(max_kv_len=7, max_q_len=7))
def test_backend_equals_spec_transcription(backend_name: str, case: AttentionCase) -> None:
    result = call(ar.get_backend(backend_name), case, return_weights=True, return_lse=True)
    assert_matches(result, AttentionOutput(*transcribed_attention(case)), case.bounds(), case)
