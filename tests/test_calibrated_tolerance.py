"""The calibrated tolerance rule for other people's kernels (``attention_ref.tolerance``) and
``assert_attention_close``: it contains the derived bound, its baseline is what it says, and it
still rejects wrong results in half precision."""

from __future__ import annotations

import numpy as np
import pytest

from attention_ref.result import AttentionOutput
from attention_ref.testing import AttentionCase, assert_attention_close
from attention_ref.testing.strategies import numpy_dtype
from attention_ref.tolerance import same_dtype_baseline


def random_case(dtype: str, *, keys: int = 160, magnitude: float = 1.0, seed: int = 0) -> AttentionCase:
    rng = np.random.default_rng(seed)
    cast = numpy_dtype(dtype)
    q = (rng.standard_normal((2, 2, 6, 8)) * magnitude).astype(cast)
    k = (rng.standard_normal((2, 2, keys, 8)) * magnitude).astype(cast)
    v = rng.standard_normal((2, 2, keys, 5)).astype(cast)
    mask = rng.random((6, keys)) < 0.8
    mask[2] = False  # a fully excluded row
    return AttentionCase(q, k, v, mask=mask)


def baseline_of(case: AttentionCase, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    k, v = case.repeated_kv()
    return same_dtype_baseline(case.q, k, v, allowed=case.allowed(), bias=case.bias, scale=case.resolved_scale,
                               softcap=case.softcap, dtype=dtype)


def test_float64_baseline_is_the_oracle_within_the_derived_bound() -> None:
    case = random_case("float64")
    oracle, bounds = case.oracle(), case.bounds()
    out, weights, lse = baseline_of(case, "float64")
    assert np.all(np.abs(out - oracle.out) <= bounds.out)
    assert np.all(np.abs(weights - oracle.weights) <= bounds.weights)
    finite = np.isfinite(oracle.lse)
    assert np.array_equal(np.isfinite(lse), finite)
    assert np.all(np.abs(lse[finite] - oracle.lse[finite]) <= bounds.lse[finite])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_baseline_values_are_in_the_input_dtype(dtype: str) -> None:
    out, weights, _ = baseline_of(random_case(dtype), dtype)
    for x in (out, weights):
        assert np.array_equal(x.astype(numpy_dtype(dtype)).astype(np.float64), x)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_calibrated_bound_contains_the_derived_bound(dtype: str) -> None:
    case = random_case(dtype, magnitude=3.0)
    derived, calibrated = case.bounds(), case.bounds(calibrated=True)
    for name in ("out", "weights", "lse"):
        assert np.all(getattr(calibrated, name) >= getattr(derived, name))
    assert "same-dtype" in calibrated.derivation


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_calibrated_bound_passes_the_baseline_and_rejects_wrong_weights(dtype: str) -> None:
    case = random_case(dtype, magnitude=3.0)
    out, weights, lse = baseline_of(case, dtype)
    assert_attention_close(AttentionOutput(out.astype(numpy_dtype(dtype)), weights, lse), case)
    oracle = case.oracle()
    # Row sums of the weight bounds stay below 1 (a same-dtype bfloat16 softmax of logits near 30 is
    # off by up to 43% per weight, so not far below): weights that are all zero cannot pass.
    assert case.bounds(calibrated=True).weights.sum(axis=-1).max() < 1
    with pytest.raises(AssertionError, match="weights"):
        assert_attention_close(AttentionOutput(oracle.out, np.zeros_like(oracle.weights), oracle.lse), case)


def test_failure_message_shows_the_bound_and_its_derivation() -> None:
    case = random_case("float16")
    oracle = case.oracle()
    wrong = oracle.out.copy()
    wrong[0, 0, 0, 0] += 0.5
    with pytest.raises(AssertionError) as failure:
        assert_attention_close(wrong.astype(np.float16), case)
    message = str(failure.value)
    assert "worst at (0, 0, 0, 0)" in message and "bound: max of [derived" in message and "AttentionCase(" in message
    nan = oracle.out.copy()
    nan[1, 1, 1, 1] = np.nan
    with pytest.raises(AssertionError, match="NaN|nan"):
        assert_attention_close(nan, case)
