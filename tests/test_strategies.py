"""The case strategy reaches the corners the properties need, with varied data."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, find, given, settings

from attention_ref.testing import AttentionCase, attention_cases

CORNERS = {
    "rank 2 (single head)": lambda c: c.q.ndim == 2,
    "two batch dims": lambda c: len(c.batch_shape) == 2,
    "L = 1": lambda c: c.q_len == 1 and c.kv_len > 1,
    "L > S > 0": lambda c: c.q_len > c.kv_len > 0,
    "S > L > 0": lambda c: c.kv_len > c.q_len > 0,
    "S = 0": lambda c: c.kv_len == 0 and c.q_len > 0,
    "E != Ev": lambda c: c.head_dim != c.value_dim,
    "Hq > Hkv > 1": lambda c: c.num_q_heads > c.num_kv_heads > 1,
    "float16": lambda c: c.dtype == "float16",
    "bfloat16": lambda c: c.dtype == "bfloat16",
    "float32": lambda c: c.dtype == "float32",
    "float64": lambda c: c.dtype == "float64",
    "a fully masked row": lambda c: c.q_len > 0 and c.kv_len > 0 and (~c.allowed().any(axis=-1)).any(),
    "-inf in the bias": lambda c: c.bias is not None and np.isneginf(c.bias.astype(float)).any(),
    "broadcast mask": lambda c: c.mask is not None and c.mask.shape != c.logits_shape,
    "bottom-right causal with L > S": lambda c: c.causal and c.alignment == "bottom_right" and c.q_len > c.kv_len,
    "scale 0": lambda c: c.scale == 0.0,
    "negative scale": lambda c: c.scale is not None and c.scale < 0,
    "softcap": lambda c: c.softcap is not None,
    "logits above 100": lambda c: c.q.size > 0 and c.kv_len > 0 and np.abs(c.logits()).max() > 100,
}


@pytest.mark.parametrize("corner", CORNERS, ids=str)
def test_strategy_reaches(corner: str) -> None:
    find(attention_cases(), CORNERS[corner], settings=settings(max_examples=2000, database=None,
                                                                suppress_health_check=list(HealthCheck)))


def test_values_are_varied() -> None:
    distinct_fractions = []

    @settings(max_examples=200, database=None)
    @given(attention_cases())
    def collect(case: AttentionCase) -> None:
        if case.q.size >= 8:
            distinct_fractions.append(len(np.unique(case.q)) / case.q.size)

    collect()
    assert len(distinct_fractions) >= 50
    assert np.mean(np.array(distinct_fractions) > 0.5) > 0.5


def test_kernel_cases_reach_several_tiles() -> None:
    from attention_ref.features import KERNEL_FEATURES
    from attention_ref.testing.strategies import Features, feature_cases

    kernel_cases = feature_cases(Features(frozenset(KERNEL_FEATURES)))
    settings_ = settings(max_examples=2000, database=None, suppress_health_check=list(HealthCheck))
    find(kernel_cases, lambda c: c.kv_len > 128 and c.q.ndim == 4, settings=settings_)
    find(kernel_cases, lambda c: c.mask is not None and c.mask.ndim >= 3 and c.q_len > 0 and c.kv_len > 0
         and (~c.mask.any(axis=(-1, -2))).any(), settings=settings_)
