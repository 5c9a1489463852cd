"""``check(..., interface="varlen")``: a kernel with FlashAttention's packed interface is checked by
every dense property (through a packed batch of equal segments) and by the varlen properties
(drawn segmentations); the planted bugs of tests/zoo/varlen.py are each caught."""

from __future__ import annotations

import pytest

from attention_ref.cli import main
from attention_ref.testing import check
from attention_ref.testing.report import Status

from .zoo.varlen import (
    FALSE_DECLARATIONS,
    HONEST_CONVENTIONS,
    VARLEN_BUG_LIST,
    VARLEN_FEATURES,
    convention_kernel,
    varlen_kernel,
)


def test_a_correct_varlen_kernel_passes_every_property() -> None:
    report = check(varlen_kernel(), framework="numpy", supports=VARLEN_FEATURES, dtypes=("float32", "float64"),
                   interface="varlen", max_examples=25, seed=0)
    assert report.passed, report.render()
    ran = {o.name for o in report.outcomes if o.status.counted}
    assert {"varlen_equals_each_segments_attention", "segments_are_independent", "causal_ignores_future_keys",
            "matches_float64_oracle"} <= ran


@pytest.mark.usefixtures("without_shrinking")
@pytest.mark.parametrize("bug", VARLEN_BUG_LIST, ids=lambda bug: bug.name)
def test_each_varlen_bug_is_caught(bug) -> None:  # type: ignore[no-untyped-def]
    report = check(varlen_kernel(**{bug.name: True}), framework="numpy", supports=VARLEN_FEATURES,
                   interface="varlen", max_examples=100, seed=0, properties=(bug.catches,))
    status = {o.name: o.status for o in report.outcomes}[bug.catches]
    assert status == Status.FAIL, f"{bug.name} ({bug.description}) not caught by {bug.catches}:\n{report.render()}"


def _declared_features(declared: dict[str, object]) -> tuple[str, ...]:
    """A kernel with a fixed alignment takes no alignment keyword: it does not declare bottom_right."""
    return tuple(f for f in VARLEN_FEATURES if f != "bottom_right" or "causal_alignment" not in declared)


@pytest.mark.parametrize("name", HONEST_CONVENTIONS)
def test_a_declared_convention_is_verified_and_reported_as_convention_differs(name: str) -> None:
    conventions, declared = HONEST_CONVENTIONS[name]
    report = check(convention_kernel(**conventions), framework="numpy", supports=_declared_features(declared),
                   interface="varlen", max_examples=25, seed=0, **declared)
    assert report.passed, report.render()
    differs = [o for o in report.outcomes if o.status == Status.CONVENTION_DIFFERS]
    assert {o.name for o in differs} >= {"varlen_equals_each_segments_attention", "matches_float64_oracle"}
    evidence = "\n".join(o.detail for o in differs)
    for key, value in declared.items():
        assert f"declared {key}='{value}'" in evidence, evidence
        assert f"{key}: {value}" in report.target
    assert "convention differs" in report.render()


@pytest.mark.usefixtures("without_shrinking")
@pytest.mark.parametrize("name", FALSE_DECLARATIONS)
def test_a_false_declaration_fails(name: str) -> None:
    conventions, declared, catches = FALSE_DECLARATIONS[name]
    report = check(convention_kernel(**conventions), framework="numpy", supports=_declared_features(declared),
                   interface="varlen", max_examples=100, seed=0, properties=(catches,),
                   **declared)
    status = {o.name: o.status for o in report.outcomes}[catches]
    assert status == Status.FAIL, f"{name} not caught by {catches}:\n{report.render()}"


def test_varlen_conventions_are_checked_and_only_for_varlen() -> None:
    with pytest.raises(ValueError, match="empty_lse must be one of -inf, \\+inf"):
        check(varlen_kernel(), framework="numpy", interface="varlen", empty_lse="nan")
    with pytest.raises(ValueError, match="conventions of interface='varlen'"):
        check(varlen_kernel(), framework="numpy", lse_layout="padded")


def test_the_varlen_interface_refuses_what_it_has_no_argument_for() -> None:
    with pytest.raises(ValueError, match="interface='varlen' has no mask, bias"):
        check(varlen_kernel(), framework="numpy", supports=("mask", "bias"), interface="varlen")
    with pytest.raises(ValueError, match="interface must be one of dense, varlen, paged"):
        check(varlen_kernel(), framework="numpy", interface="ragged")


def test_cli_checks_a_varlen_kernel(tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "packed.py").write_text("from tests.zoo.varlen import varlen_kernel\nattention = varlen_kernel()\n")
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    status = main(["check", "packed:attention", "--framework", "numpy", "--interface", "varlen", "--supports",
                   "causal,bottom_right", "--max-examples", "5", "--seed", "0", "--workers", "1", "--progress", "none"])
    assert status == 0, capsys.readouterr().out


def test_cli_checks_a_varlen_kernel_with_declared_conventions(tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fa2.py").write_text("from tests.zoo.varlen import convention_kernel\n"
                                     "attention = convention_kernel(empty_lse='+inf', lse_layout='padded', "
                                     "alignment='bottom_right')\n")
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    status = main(["check", "fa2:attention", "--framework", "numpy", "--interface", "varlen", "--supports",
                   "causal,lse", "--empty-lse", "+inf", "--lse-layout", "padded", "--causal-alignment",
                   "bottom_right", "--max-examples", "5", "--seed", "0", "--workers", "1", "--progress", "none"])
    shown = capsys.readouterr().out
    assert status == 0, shown
    assert "convention differs" in shown and "declared empty_lse='+inf'" in shown, shown


def test_a_fixed_bottom_right_kernel_without_windows_gets_top_left_cases_padded_or_split() -> None:
    report = check(convention_kernel(alignment="bottom_right"), framework="numpy", supports=("causal", "lse"),
                   interface="varlen", causal_alignment="bottom_right", max_examples=25, seed=0,
                   properties=("matches_float64_oracle", "causal_ignores_future_keys",
                               "varlen_equals_each_segments_attention"))
    assert report.passed, report.render()
    assert "declared causal_alignment='bottom_right'" in report.render()
