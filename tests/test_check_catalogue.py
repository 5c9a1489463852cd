"""The checker, with default settings, flags every buggy kernel of tests/kernels.py and passes every
correct one (several seeds for the bugs; measured over more seeds in benchmarks/ and the issue notes)."""

from __future__ import annotations

import pytest

from attention_ref.testing.check import check
from attention_ref.testing.strategies import KERNEL_FEATURES

from .conftest import import_or_skip

import_or_skip("torch")

from .kernels import BUGGY_KERNELS, CORRECT_KERNELS  # noqa: E402

ALL_DTYPES = ("float16", "bfloat16", "float32", "float64")


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", list(BUGGY_KERNELS))
def test_buggy_kernel_is_flagged(name: str, seed: int) -> None:
    kernel, supports, description = BUGGY_KERNELS[name]
    report = check(kernel, framework="torch", supports=supports, dtypes=ALL_DTYPES, seed=seed, fail_fast=True)
    assert not report.passed, f"{name} ({description}) was not flagged:\n{report}"


#: Examples per property for the correct kernels in CI: the default (100), except the tile-1 kernel
#: (a Python loop over every key, about 3x slower); benchmarks/checker.py runs all at the default.
CI_EXAMPLES = {"tiled_1": 25}


@pytest.mark.parametrize("name", list(CORRECT_KERNELS))
def test_correct_kernel_passes(name: str) -> None:
    report = check(CORRECT_KERNELS[name], framework="torch", supports=KERNEL_FEATURES, dtypes=ALL_DTYPES, seed=0,
                   max_examples=CI_EXAMPLES.get(name, 100))
    assert report.passed, str(report)
