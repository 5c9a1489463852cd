"""The checker flags every buggy kernel of tests/kernels.py and tests/kernels_backward.py and passes
every correct one (CI: seed 0, fewer examples for the slow ones; measured over more seeds at the
default settings by benchmarks/checker.py and in the issue notes)."""

from __future__ import annotations

import pytest

from attention_ref.testing.check import check

from .conftest import import_or_skip

import_or_skip("torch")

from .kernels import ALL_FEATURES, BUGGY_KERNELS, CORRECT_KERNELS  # noqa: E402
from .kernels_backward import ALL_FEATURES_WITH_GRAD, BUGGY_BACKWARD_KERNELS, reference_kernel_with_backward  # noqa: E402

ALL_DTYPES = ("float16", "bfloat16", "float32", "float64")


@pytest.mark.parametrize("seed", [0])
@pytest.mark.parametrize("name", list(BUGGY_KERNELS))
def test_buggy_kernel_is_flagged(name: str, seed: int) -> None:
    kernel, supports, description = BUGGY_KERNELS[name]
    report = check(kernel, framework="torch", supports=supports, dtypes=ALL_DTYPES, seed=seed, fail_fast=True)
    assert not report.passed, f"{name} ({description}) was not flagged:\n{report}"


#: Examples per property for the correct kernels in CI: 50 (the default is 100), 25 for the tile-1
#: kernel (a Python loop over every key, about 3x slower); benchmarks/checker.py runs all at the
#: default over several seeds, for the catch rate and false alarms it reports.
CI_EXAMPLES = {"tiled_1": 25}


@pytest.mark.parametrize("name", list(CORRECT_KERNELS))
def test_correct_kernel_passes(name: str) -> None:
    report = check(CORRECT_KERNELS[name], framework="torch", supports=ALL_FEATURES, dtypes=ALL_DTYPES, seed=0,
                   max_examples=CI_EXAMPLES.get(name, 50))
    assert report.passed, str(report)


#: Examples per property for the backward catalogue in CI (benchmarks/checker.py runs the default, 100):
#: a gradient bug is flagged by the first example that has the feature it breaks.
BACKWARD_CI_EXAMPLES = 30


@pytest.mark.parametrize("name", list(BUGGY_BACKWARD_KERNELS))
def test_buggy_backward_kernel_is_flagged(name: str) -> None:
    kernel, description = BUGGY_BACKWARD_KERNELS[name]
    report = check(kernel, framework="torch", supports=ALL_FEATURES_WITH_GRAD, dtypes=ALL_DTYPES, seed=0,
                   fail_fast=True, max_examples=BACKWARD_CI_EXAMPLES)
    assert not report.passed, f"{name} ({description}) was not flagged:\n{report}"


def test_correct_backward_kernel_passes() -> None:
    report = check(reference_kernel_with_backward, framework="torch", supports=ALL_FEATURES_WITH_GRAD,
                   dtypes=ALL_DTYPES, seed=0, max_examples=BACKWARD_CI_EXAMPLES)
    assert report.passed, str(report)
    statuses = {o.name: o.status for o in report.outcomes}
    assert all(statuses[name] == "pass" for name in ("gradients_match_float64_oracle", "gradients_match_finite_differences",
                                                     "window_equals_explicit_mask", "dropout_equals_manual_computation"))
