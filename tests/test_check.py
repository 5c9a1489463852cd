"""``attention_ref.testing.check``: correct kernels pass, a declared convention is honoured, bugs fail."""

from __future__ import annotations

import pytest

import attention_ref as ar
from attention_ref.cli import main
from attention_ref.features import KERNEL_FEATURES
from attention_ref.testing.check import check

from .conftest import import_or_skip

torch = import_or_skip("torch")
ALL_DTYPES = ("float16", "bfloat16", "float32", "float64")


def torch_kernel(q, k, v, **keywords):
    """A correct kernel: our torch backend, (B, H, L, E)."""
    return ar.get_backend("torch").attention(q, k, v, **keywords)


def torch_kernel_blhd(q, k, v, **keywords):
    """The same kernel in the (B, L, H, E) layout of jax and FlashAttention."""
    result = torch_kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **keywords)
    if isinstance(result, tuple):
        return result.out.transpose(1, 2), result.weights, None if result.lse is None else result.lse.transpose(1, 2)
    return result.transpose(1, 2)


def nan_on_fully_masked_rows(q, k, v, **keywords):
    """Correct except that fully masked rows are NaN (the naive-softmax convention)."""
    result = torch_kernel(q, k, v, return_weights=True, **keywords)
    return result.out.masked_fill((result.weights.sum(-1) == 0)[..., None], float("nan"))


def inverted_mask(q, k, v, *, mask=None, **keywords):
    """A bug: True is taken to mean 'masked out'."""
    return torch_kernel(q, k, v, mask=None if mask is None else ~mask, **keywords)


def test_correct_kernel_passes_in_the_blhd_layout() -> None:
    """The (B, L, H, E) layout of jax and FlashAttention (the (B, H, L, E) one: our torch backend as a
    kernel, below)."""
    report = check(torch_kernel_blhd, framework="torch", supports=KERNEL_FEATURES, layout="blhd",
                   dtypes=ALL_DTYPES, max_examples=25, seed=0)
    assert report.passed, str(report)
    statuses = {o.name: o.status for o in report.outcomes}
    assert statuses["matches_float64_oracle"] == "pass" and statuses["bad_inputs_raise_the_spec_errors"] == "n/a"


@pytest.mark.parametrize("backend", ["numpy", "jax", "torch"])
def test_our_backends_pass_as_kernels(backend: str) -> None:
    """Each of our backends, seen as someone else's kernel, passes (calibrated rule, every dtype)."""
    import_or_skip(backend)
    implementation = ar.get_backend(backend)

    def kernel(q, k, v, **keywords):
        return implementation.attention(q, k, v, **keywords)

    # Gradients: NumPy through our analytic backward (backward=), torch through autograd of the kernel.
    # (jax.vjp of a kernel is exercised on jax.nn in test_crosscheck.py; under a trace our JAX backend
    # compiles per shape, which is slow, and its vjp is proven by the properties directly; likewise rule 22's
    # programs, one compilation per score_mod, which tests/test_properties.py proves on the JAX backend.)
    slow_on_jax = ("grad", "dbias", "score_mod", "mask_mod")
    supports = KERNEL_FEATURES if backend != "jax" else tuple(f for f in KERNEL_FEATURES if f not in slow_on_jax)
    backward = implementation.attention_vjp if backend == "numpy" else None
    report = check(kernel, framework=backend, supports=supports, dtypes=ALL_DTYPES, max_examples=15, seed=0,
                   backward=backward)
    assert report.passed, str(report)
    statuses = {o.name: o.status for o in report.outcomes}
    assert statuses["window_equals_explicit_mask"] == "pass"
    assert statuses["gradients_match_float64_oracle"] == ("pass" if backend != "jax" else "n/a")
    assert statuses["matches_float64_oracle"] == "pass" and statuses["bad_inputs_raise_the_spec_errors"] == "n/a"


def test_declared_fully_masked_convention() -> None:
    supports = ("mask", "causal", "bottom_right")
    declared = check(nan_on_fully_masked_rows, framework="torch", supports=supports, fully_masked="nan",
                     max_examples=25, seed=0)
    assert declared.passed, str(declared)
    assert {o.name: o.status for o in declared.outcomes}["fully_excluded_rows_are_zero"] == "convention differs"
    undeclared = check(nan_on_fully_masked_rows, framework="torch", supports=supports, max_examples=25, seed=0,
                       properties=("fully_excluded_rows_are_zero",))
    assert not undeclared.passed
    assert {o.name: o.status for o in undeclared.outcomes}["fully_excluded_rows_are_zero"] == "FAIL"


def test_bug_is_reported_with_a_shrunk_case() -> None:
    report = check(inverted_mask, framework="torch", supports=("mask",), max_examples=10, seed=0,
                   properties=("matches_float64_oracle",))
    assert not report.passed
    failure = next(o for o in report.outcomes if o.name == "matches_float64_oracle")
    assert failure.status == "FAIL" and "AttentionCase(" in failure.detail
    assert str(report).splitlines()[-1].endswith("failed, 0 errors") and "FAIL matches_float64_oracle:" in str(report)
    # The table holds the one property that ran; the others are counted under it.
    assert f"not run: {len(report.outcomes) - 1} more" in str(report)
    assert "weights_rows_sum_to_one" not in str(report)


def refuses_causal(q, k, v, *, causal=False, **keywords):
    """Declares causal, then raises TypeError on it: the property could not run (ERROR, not FAIL)."""
    if causal:
        raise TypeError("causal is not implemented")
    return torch_kernel(q, k, v, **keywords)


def returns_two_values(q, k, v, **keywords):
    """A calling-convention mismatch: (out, weights) where (out, weights, lse) is the convention."""
    result = torch_kernel(q, k, v, **{**keywords, "return_weights": True})
    return result.out, result.weights


def test_kernel_that_raises_on_a_supported_keyword_is_an_error() -> None:
    report = check(refuses_causal, framework="torch", supports=("causal", "mask"), max_examples=10, seed=0,
                   properties=("matches_float64_oracle", "causal_equals_explicit_mask"))
    statuses = {o.name: o.status for o in report.outcomes}
    assert statuses["matches_float64_oracle"] == "ERROR" and statuses["causal_equals_explicit_mask"] == "ERROR"
    assert not report.passed
    error = next(o for o in report.outcomes if o.status == "ERROR")
    assert "KernelError: refuses_causal raised TypeError: causal is not implemented" in error.detail
    assert "causal=True" in error.detail
    lines = str(report).splitlines()
    assert lines[-1] == "0 passed, 0 failed, 2 errors"
    assert "ERROR matches_float64_oracle:" in lines


def test_calling_convention_mismatch_is_an_error() -> None:
    report = check(returns_two_values, framework="torch", supports=("weights",), max_examples=5, seed=0,
                   properties=("matches_float64_oracle",))
    outcome = next(o for o in report.outcomes if o.name == "matches_float64_oracle")
    assert outcome.status == "ERROR" and "returned a tuple of 2 values" in outcome.detail


def test_unknown_feature_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown supports"):
        check(torch_kernel, framework="torch", supports=("paged_kv",))
    with pytest.raises(ValueError, match="needs backward="):
        check(torch_kernel, framework="numpy", supports=("grad",))


def test_cli_check(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["check", "tests.test_check:torch_kernel", "--framework", "torch", "--supports", "mask,causal",
                   "--dtype", "float32", "--dtype", "bfloat16", "--max-examples", "10", "--seed", "0"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert out.splitlines()[-1].endswith("passed, 0 failed, 0 errors")
    assert main(["check", "tests.test_check:inverted_mask", "--framework", "torch", "--supports", "mask",
                 "--max-examples", "10", "--seed", "0", "--property", "matches_float64_oracle"]) == 1


def drops_last_channel(q, k, v, **keywords):
    """A bug: out loses its last channel (a wrong shape is a wrong answer: FAIL, not ERROR)."""
    result = torch_kernel(q, k, v, **keywords)
    return result[..., :-1]


def forgets_weights(q, k, v, **keywords):
    """Declares weights but returns None for them: a calling-convention mismatch (ERROR)."""
    result = torch_kernel(q, k, v, **keywords)
    return (result.out, None, result.lse) if isinstance(result, tuple) else result


def test_wrong_output_shape_fails() -> None:
    chosen = ("matches_float64_oracle", "batch_dims_equal_a_loop")
    report = check(drops_last_channel, framework="torch", max_examples=10, seed=0, properties=chosen)
    outcomes = {o.name: o for o in report.outcomes}
    for name in chosen:
        assert outcomes[name].status == "FAIL" and "out: shape" in outcomes[name].detail, str(report)


def test_a_declared_result_that_is_missing_is_an_error() -> None:
    report = check(forgets_weights, framework="torch", supports=("weights",), max_examples=5, seed=0,
                   properties=("weights_rows_sum_to_one",))
    outcome = next(o for o in report.outcomes if o.name == "weights_rows_sum_to_one")
    assert outcome.status == "ERROR" and "declares 'weights' but returned None" in outcome.detail
