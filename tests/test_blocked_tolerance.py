"""Rule 19's tolerance terms hold for a literal transcription of its online softmax in the compute
dtype, at the worst tiling (key blocks of 1: a rescaling per key) and others; and the terms are
needed (the dense bound alone is smaller)."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from attention_ref.result import AttentionOutput
from attention_ref.testing import AttentionCase, attention_cases
from attention_ref.testing.assertions import assert_matches
from attention_ref.tolerance import UNIT_ROUNDOFF
from attention_ref.tolerance.forward import key_blocks, row_error

from .blocked_transcription import transcribed_online_softmax


@given(case=attention_cases(max_kv_len=9, max_q_len=5), block_k=st.sampled_from((1, 2, 3, 5, 64)))
def test_online_softmax_transcription_is_within_rule_19_bound(case: AttentionCase, block_k: int) -> None:
    out, lse = transcribed_online_softmax(case, block_k)
    assert_matches(AttentionOutput(out, None, lse), case.oracle(), case.bounds(key_block=block_k), case)


def test_rule_19_terms_grow_with_the_key_blocks() -> None:
    u = UNIT_ROUNDOFF["float32"]
    sizes = dict(dot_size=np.array([3.0]), bias_size=np.array([1.0]), softcap=None, head_dim=8, keys=64,
                 extra_logit_error=0.0)
    dense = row_error(u, **sizes, num_key_blocks=1)
    blocked = row_error(u, **sizes, num_key_blocks=key_blocks(64, 1))
    assert key_blocks(64, 1) == 64 and key_blocks(64, 64) == 1 and key_blocks(65, 64) == 2 and key_blocks(0, 8) == 1
    assert np.all(blocked[0] > dense[0]) and np.all(blocked[1] > dense[1]) and np.all(blocked[2] > dense[2])
