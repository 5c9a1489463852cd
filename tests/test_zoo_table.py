"""The zoo's table (tests/zoo/bugs.py) is well formed, and README.md lists the same bugs."""

from __future__ import annotations

import pathlib
import re

import pytest

from attention_ref.features import KERNEL_FEATURES
from attention_ref.testing import get_property
from attention_ref.testing.strategies import Features

from .conftest import import_or_skip

import_or_skip("torch")

from .zoo import (  # noqa: E402
    ALL_DTYPES,
    ALL_FEATURES,
    BUGS,
    CORRECT_KERNELS,
    KERNEL_BUGS,
    TILED_BUGS,
    TILED_FEATURES,
    Bug,
    buggy_kernel,
    make_kernel,
    markdown_table,
    tiled_kernel,
)

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_one_row_per_switch() -> None:
    names = [bug.name for bug in BUGS]
    assert len(names) == len(set(names))
    assert set(names) == set(KERNEL_BUGS) | set(TILED_BUGS) and not set(KERNEL_BUGS) & set(TILED_BUGS)
    assert len(BUGS) >= 46  # 28 + 12 of the former catalogues, the NumPy backends' float64 downcast, 5 of rule 22
    with pytest.raises(ValueError, match="unknown bugs"):
        make_kernel(no_such_bug=True)
    with pytest.raises(ValueError, match="unknown bugs"):
        tiled_kernel(32, causal_strict=True)


@pytest.mark.parametrize("bug", BUGS, ids=[bug.name for bug in BUGS])
def test_row_is_checkable(bug: Bug) -> None:
    assert bug.description and "|" not in bug.description and "\n" not in bug.description
    supports = bug.supports
    assert set(supports) <= set(KERNEL_FEATURES) and len(set(supports)) == len(supports)
    assert set(supports) <= set(TILED_FEATURES if bug.name in TILED_BUGS else ALL_FEATURES)
    prop = get_property(bug.catches)
    assert prop.applies_to(Features(frozenset(supports), ALL_DTYPES)), f"{prop.name} is n/a with {supports}"
    assert buggy_kernel(bug.name).__name__ == bug.name


def test_supports_are_per_bug() -> None:
    assert len({bug.supports for bug in BUGS}) > 10
    assert all(set(bug.supports) < set(ALL_FEATURES) for bug in BUGS)
    assert set(CORRECT_KERNELS["reference"].supports) == set(KERNEL_FEATURES)


def _readme_rows() -> list[tuple[str, str, str]]:
    text = README.read_text()
    section = text.split("## Checking your own kernel", 1)[1].split("\n## ", 1)[0]
    header = "| bug | what it does | caught by |"
    assert header in section, f"README.md's section 'Checking your own kernel' has no table {header!r}"
    lines = section.split(header, 1)[1].strip().splitlines()[1:]  # below the |---| line
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        assert len(cells) == 3, line
        name, description, catches = cells
        rows.append((name.strip("`"), description, catches.strip("`")))
    return rows


def test_readme_lists_the_zoo() -> None:
    expected = [(bug.name, bug.description, bug.catches) for bug in BUGS]
    assert _readme_rows() == expected, f"README.md's bug table differs from tests/zoo/bugs.py; it should be:\n" \
                                       f"{markdown_table()}"
    assert markdown_table() in README.read_text()
    counts = re.findall(r"(\d+) deliberately planted bugs|\| (\d+) planted bugs|The (\d+) bugs", README.read_text())
    assert len(counts) == 3 and all(int("".join(n)) == len(BUGS) for n in counts), counts
