"""The checker catches every bug of the zoo (tests/zoo/) with the property the zoo's table names, and
passes every correct kernel of the zoo (CI: seed 0; benchmarks/checker.py measures the catch rate
and false alarms over more seeds at the default settings)."""

from __future__ import annotations

import pytest

from attention_ref.features import KERNEL_FEATURES
from attention_ref.testing import PROPERTIES
from attention_ref.testing.check import CheckReport, check

from .conftest import import_or_skip

import_or_skip("torch")

from .zoo import ALL_DTYPES, BUGS, BUGS_BY_NAME, CORRECT_KERNELS  # noqa: E402

#: Examples for a bug's one property: the cap on the search, which stops at the first failure.
BUG_CI_EXAMPLES = 100


@pytest.mark.usefixtures("without_shrinking")
@pytest.mark.parametrize("name", [bug.name for bug in BUGS])
def test_bug_is_caught_by_its_property(name: str) -> None:
    bug = BUGS_BY_NAME[name]
    report = check(bug.kernel, framework="torch", supports=bug.supports, dtypes=ALL_DTYPES, seed=0,
                   properties=(bug.catches,), max_examples=BUG_CI_EXAMPLES)
    status = _statuses(report)[bug.catches]
    assert status == "FAIL", f"{name} ({bug.description}) was not caught by {bug.catches}:\n{report}"
    assert all(s == "not run" for p, s in _statuses(report).items() if p != bug.catches), str(report)


#: Bugs that a second property must catch too (the oracle comparison sees every forward bug that
#: changes out on cases the bug's features reach); kept from the catalogue of buggy backends.
ALSO_CAUGHT = [("scale_from_value_dim", "matches_float64_oracle"),
               ("causal_one_key_too_many", "matches_float64_oracle")]


@pytest.mark.usefixtures("without_shrinking")
@pytest.mark.parametrize(("name", "catches"), ALSO_CAUGHT, ids=[f"{n}-{p}" for n, p in ALSO_CAUGHT])
def test_bug_is_also_caught_by(name: str, catches: str) -> None:
    bug = BUGS_BY_NAME[name]
    report = check(bug.kernel, framework="torch", supports=bug.supports, dtypes=ALL_DTYPES, seed=0,
                   properties=(catches,), max_examples=BUG_CI_EXAMPLES)
    assert _statuses(report)[catches] == "FAIL", str(report)


def _statuses(report: CheckReport) -> dict[str, str]:
    return {o.name: o.status for o in report.outcomes}


#: Examples per property for the correct kernels in CI: 50 (the default is 100) for the reference,
#: 30 for the tiled kernels of 16, 32 and 64 keys (they differ only in the tile, and the cases reach
#: several tiles in one example in eight), 25 for the tile-1 kernel (a Python loop over every key,
#: about 3x slower), 30 for the gradient properties of the
#: reference kernel (its own backward); benchmarks/checker.py runs all at the default over several
#: seeds, for the false alarms it reports.
CI_EXAMPLES = {"tiled_1": 25, "tiled_16": 30, "tiled_32": 30, "tiled_64": 30}
GRADIENT_CI_EXAMPLES = 30
GRADIENT_PROPERTIES = tuple(p.name for p in PROPERTIES if "grad" in p.requires)
FORWARD_PROPERTIES = tuple(p.name for p in PROPERTIES if "grad" not in p.requires)

CORRECT_RUNS = [pytest.param(name, FORWARD_PROPERTIES, CI_EXAMPLES.get(name, 50), id=name) for name in CORRECT_KERNELS]
CORRECT_RUNS.append(pytest.param("reference", GRADIENT_PROPERTIES, GRADIENT_CI_EXAMPLES, id="reference-gradients"))


@pytest.mark.parametrize(("name", "properties", "examples"), CORRECT_RUNS)
def test_correct_kernel_passes(name: str, properties: tuple[str, ...], examples: int) -> None:
    kernel = CORRECT_KERNELS[name]
    report = check(kernel.kernel, framework="torch", supports=kernel.supports, dtypes=ALL_DTYPES, seed=0,
                   properties=properties, max_examples=examples)
    statuses = _statuses(report)
    assert all(statuses[p] in ("pass", "n/a") for p in properties), str(report)
    if name == "reference":  # its features reach every property a kernel can have
        # the properties that need a feature only SPEC.md's own implementations have (our backends)
        beyond_kernels = {p.name for p in PROPERTIES if p.requires - set(KERNEL_FEATURES)}
        assert all(statuses[p] == "pass" for p in properties if p not in beyond_kernels), str(report)
