"""check_layer catches every bug of the layer zoo (tests/zoo/layer_bugs.py) with the property its table
names, passes the correct layer, and README.md lists the same table."""

from __future__ import annotations

import pathlib

import pytest

from attention_ref.testing import check_layer
from attention_ref.testing.layer_properties import LAYER_PROPERTIES, get_layer_property
from attention_ref.testing.layer_subjects import LAYER_FEATURES
from attention_ref.testing.report import Status

from .conftest import import_or_skip

import_or_skip("torch")

from .zoo.layer_bugs import (  # noqa: E402
    LAYER_BUG_SWITCHES,
    LAYER_BUGS,
    LAYER_BUGS_BY_NAME,
    LAYER_DECLARATIONS,
    LAYER_SUPPORTS,
    make_layer,
    markdown_table,
)

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
#: Examples for a bug's one property: the cap on the search, which stops at the first failure.
BUG_EXAMPLES = 100


@pytest.mark.usefixtures("without_shrinking")
@pytest.mark.parametrize("name", [bug.name for bug in LAYER_BUGS])
def test_bug_is_caught_by_its_property(name: str) -> None:
    bug = LAYER_BUGS_BY_NAME[name]
    report = check_layer(bug.make, framework="torch", supports=bug.supports, **LAYER_DECLARATIONS, seed=0,
                         max_examples=BUG_EXAMPLES, properties=(bug.catches,))
    statuses = {o.name: o.status for o in report.outcomes}
    assert statuses[bug.catches] == Status.FAIL, f"{name} ({bug.description}) not caught by {bug.catches}:\n{report}"
    assert all(s == Status.NOT_RUN for p, s in statuses.items() if p != bug.catches), str(report)


def test_correct_layer_passes_every_property_in_every_dtype() -> None:
    report = check_layer(make_layer(), framework="torch", supports=LAYER_SUPPORTS, **LAYER_DECLARATIONS, seed=0,
                         max_examples=25, dtypes=("float16", "bfloat16", "float32", "float64"))
    assert report.passed, str(report)
    statuses = {o.name: o.status for o in report.outcomes}
    assert statuses.pop("converters_round_trip") == Status.NOT_APPLICABLE  # instances only
    assert set(statuses.values()) <= {Status.PASS, Status.CONVENTION_DIFFERS}, str(report)
    # Its declared weights (head-averaged, after dropout) were exercised and verified, and said so.
    assert statuses["weights_follow_declared_convention"] == Status.CONVENTION_DIFFERS
    text = report.render()
    assert "weights: averaged over the heads" in text and "weights: after dropout" in text


def test_one_row_per_switch() -> None:
    names = [bug.name for bug in LAYER_BUGS]
    assert len(names) == len(set(names)) == len(LAYER_BUG_SWITCHES) >= 8
    assert {bug.catches for bug in LAYER_BUGS} >= {"layer_matches_reference", "identity_projections_equal_attention",
                                                   "gqa_equals_repeated_kv_heads", "key_padding_equals_mask",
                                                   "weights_follow_declared_convention",
                                                   "dropout_matches_explicit_mask",
                                                   "fully_masked_rows_follow_declared_convention"}
    with pytest.raises(ValueError, match="unknown bugs"):
        make_layer(no_such_bug=True)
    for bug in LAYER_BUGS:
        assert bug.description and "|" not in bug.description
        assert set(bug.supports) <= set(LAYER_SUPPORTS) <= set(LAYER_FEATURES)
        assert get_layer_property(bug.catches) in LAYER_PROPERTIES


def _readme_rows() -> list[tuple[str, str, str]]:
    text = README.read_text()
    section = text.split("### Checking a layer", 1)[1].split("\n## ", 1)[0]
    header = "| bug | what it does | caught by |"
    assert header in section, f"README.md's section 'Checking a layer' has no table {header!r}"
    rows = []
    for line in section.split(header, 1)[1].strip().splitlines()[1:]:
        if not line.startswith("|"):
            break
        name, description, catches = (cell.strip() for cell in line.strip().strip("|").split("|"))
        rows.append((name.strip("`"), description, catches.strip("`")))
    return rows


def test_readme_lists_the_layer_zoo() -> None:
    expected = [(bug.name, bug.description, bug.catches) for bug in LAYER_BUGS]
    assert _readme_rows() == expected, f"README.md's layer bug table differs from tests/zoo/layer_bugs.py; it " \
                                       f"should be:\n{markdown_table()}"
    assert f"{len(LAYER_BUGS)} planted layer bugs" in README.read_text()


#: Bugs a second property must catch too: the exact property sees every bug that reads a key no query
#: may attend.
ALSO_CAUGHT = [("padding_mask_head_major", "ignored_keys_change_nothing"),
               ("causal_dropped_with_key_padding", "ignored_keys_change_nothing"),
               ("scale_from_model_dim", "identity_projections_equal_attention")]


@pytest.mark.usefixtures("without_shrinking")
@pytest.mark.parametrize(("name", "catches"), ALSO_CAUGHT, ids=[f"{n}-{p}" for n, p in ALSO_CAUGHT])
def test_bug_is_also_caught_by(name: str, catches: str) -> None:
    bug = LAYER_BUGS_BY_NAME[name]
    report = check_layer(bug.make, framework="torch", supports=bug.supports, **LAYER_DECLARATIONS, seed=0,
                         max_examples=BUG_EXAMPLES, properties=(catches,))
    assert {o.name: o.status for o in report.outcomes}[catches] == Status.FAIL, str(report)
