"""``check(..., interface="paged")``: a kernel with a paged KV-cache interface is checked by every dense
property (through a batch of sequences whose caches hold the dense case's keys in pages) and by the
paged properties (drawn page tables); the planted bugs of tests/zoo/paged.py are each caught."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import attention_ref as ar
from attention_ref.cli import main
from attention_ref.testing import assert_attention_close, check
from attention_ref.testing.cases import AttentionCase
from attention_ref.testing.paged_kernels import dense_through_paged, top_left_as_bottom_right
from attention_ref.testing.report import Status

from .zoo.paged import PAGED_BUG_LIST, PAGED_FEATURES, paged_kernel


def test_a_correct_paged_kernel_passes_every_property() -> None:
    report = check(paged_kernel(), framework="numpy", supports=PAGED_FEATURES, dtypes=("float32", "float64"),
                   interface="paged", max_examples=25, seed=0)
    assert report.passed, report.render()
    ran = {o.name for o in report.outcomes if o.status.counted}
    assert {"paged_equals_dense_on_gathered_cache", "paged_is_invariant_to_page_permutation",
            "causal_ignores_future_keys", "matches_float64_oracle"} <= ran


def test_a_causal_only_paged_kernel_passes_the_dense_properties_of_both_alignments() -> None:
    """Without the window feature, top-left causal cases reach the kernel padded (L < S) or split (L > S)."""
    report = check(paged_kernel(), framework="numpy", supports=("causal", "lse"), interface="paged",
                   max_examples=25, seed=0, properties=("matches_float64_oracle", "causal_ignores_future_keys"))
    assert report.passed, report.render()


@pytest.mark.parametrize("window", [True, False], ids=["reversed", "padded_or_split"])
@pytest.mark.parametrize(("length", "keys"), [(2, 7), (7, 2), (4, 4), (3, 0), (0, 3)])
def test_dense_cases_reach_the_paged_kernel_at_either_alignment(window: bool, length: int, keys: int) -> None:
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(shape) for shape in ((2, 4, length, 3), (2, 2, keys, 3), (2, 2, keys, 5)))
    dense = dense_through_paged(paged_kernel(), ar.get_backend("numpy"), window=window)
    windows = [None, (1, 0), (None, 1), (2, 2)] if window else [None]
    for alignment in ("top_left", "bottom_right"):
        for win in windows:
            options: dict[str, Any] = dict(causal=True, alignment=alignment, window=win)
            out, _, lse = dense(q, k, v, **options, return_lse=True)
            case = AttentionCase(q=q, k=k, v=v, **options)
            assert_attention_close(ar.AttentionOutput(out, None, lse), case, calibrated=False)
    assert top_left_as_bottom_right(length, keys, True, None, window) in {
        "same", "reversed" if window else "padded" if length < keys else "split"}


@pytest.mark.usefixtures("without_shrinking")
@pytest.mark.parametrize("bug", PAGED_BUG_LIST, ids=lambda bug: bug.name)
def test_each_paged_bug_is_caught(bug) -> None:
    report = check(paged_kernel(**{bug.name: True}), framework="numpy", supports=PAGED_FEATURES,
                   interface="paged", max_examples=100, seed=0, properties=(bug.catches,))
    status = {o.name: o.status for o in report.outcomes}[bug.catches]
    assert status == Status.FAIL, f"{bug.name} ({bug.description}) not caught by {bug.catches}:\n{report.render()}"


def test_the_paged_interface_refuses_what_it_has_no_argument_for() -> None:
    with pytest.raises(ValueError, match="interface='paged' has no mask, bias"):
        check(paged_kernel(), framework="numpy", supports=("mask", "bias"), interface="paged")
    with pytest.raises(ValueError, match="interface='paged' has its own layout"):
        check(paged_kernel(), framework="numpy", layout="blhd", interface="paged")
    with pytest.raises(ValueError, match="interface must be one of dense, varlen, paged"):
        check(paged_kernel(), framework="numpy", interface="ragged")


def test_the_paged_kernel_gets_int32_arrays_and_no_alignment() -> None:
    seen: list[dict[str, Any]] = []
    kernel = paged_kernel()

    def spy(q, k_cache, v_cache, block_table, cache_seqlens, **keywords):
        seen.append({"table": block_table.dtype, "lengths": cache_seqlens.dtype, **keywords})
        return kernel(q, k_cache, v_cache, block_table, cache_seqlens, **keywords)

    report = check(spy, framework="numpy", supports=("causal",), interface="paged", max_examples=5, seed=0,
                   properties=("paged_equals_dense_on_gathered_cache", "matches_float64_oracle"))
    assert report.passed, report.render()
    assert all(s["table"] == np.int32 and s["lengths"] == np.int32 and "alignment" not in s for s in seen)
    assert all(s["cu_seqlens_q"].dtype == np.int32 for s in seen if "cu_seqlens_q" in s)
    assert all("max_seqlen_q" in s for s in seen)


def test_cli_checks_a_paged_kernel(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cached.py").write_text("from tests.zoo.paged import paged_kernel\nattention = paged_kernel()\n")
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    status = main(["check", "cached:attention", "--framework", "numpy", "--interface", "paged", "--supports",
                   "causal,window", "--max-examples", "5", "--seed", "0", "--workers", "1", "--progress", "none"])
    assert status == 0, capsys.readouterr().out


def test_the_interface_features_are_those_check_in_workers_selects_with() -> None:
    from attention_ref.testing.check import interface_features, kernel_features

    base = kernel_features(("causal", "lse"), ("float32",))
    assert {"paged", "bottom_right"} <= interface_features(base, "paged").supports
    assert "bottom_right" not in interface_features(base, "varlen").supports
    assert "bottom_right" in interface_features(base, "varlen", "bottom_right").supports
    assert interface_features(base, "dense") == base


@pytest.mark.usefixtures("without_shrinking")
def test_a_paged_failure_records_its_case_in_the_json_report() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    from attention_ref.testing.report_files import schema

    for prop in ("paged_equals_dense_on_gathered_cache", "paged_is_invariant_to_page_permutation"):
        report = check(paged_kernel(physical_page_order=True), framework="numpy", supports=PAGED_FEATURES,
                       interface="paged", max_examples=100, seed=0, properties=(prop,))
        document = report.document()
        jsonschema.validate(document, schema())
        failed = [o for o in report.outcomes if o.status == Status.FAIL]
        assert [o.name for o in failed] == [prop] and failed[0].case is not None
        # the case compared (one sequence on its gathered cache), the paged call in the detail's note
        assert failed[0].case["kind"] == "attention", failed[0].case
        assert "the paged case: PagedCase(" in failed[0].detail and "block_table=" in failed[0].detail
