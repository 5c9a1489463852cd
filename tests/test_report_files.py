"""Machine-readable reports (``--json``, ``--junit-xml``), property selection by rule (``--rules``),
progress, and ``check --workers``: one report model, the same report whatever the selection path."""

from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import attention_ref as ar
from attention_ref.cli import main
from attention_ref.testing import PROPERTIES
from attention_ref.testing.check import check
from attention_ref.testing.progress import BarProgress, LineProgress, Progress, make_progress
from attention_ref.testing.report import Status
from attention_ref.testing.report_files import SCHEMA_VERSION, STATUS_NAMES, junit_tree, report_document, schema

from .conftest import import_or_skip

jsonschema = import_or_skip("jsonschema")
import_or_skip("torch")

from .zoo import BUGS_BY_NAME  # noqa: E402

CAUSAL_BUG = BUGS_BY_NAME["causal_one_key_too_many"]


@pytest.fixture(scope="module")
def causal_bug_report() -> Any:
    """The causal off-by-one of the zoo, checked with the property that catches it and one that passes."""
    return check(CAUSAL_BUG.kernel, framework="torch", supports=CAUSAL_BUG.supports, seed=0, max_examples=50,
                 properties=(CAUSAL_BUG.catches, "matches_float64_oracle"))


def _numpy_reference(q: Any, k: Any, v: Any, **keywords: Any) -> Any:
    return ar.attention(q, k, v, backend="numpy", **keywords)


def _raising_kernel(q: Any, k: Any, v: Any, **keywords: Any) -> Any:
    raise TypeError("this kernel is broken")


def test_json_of_a_failure_validates_and_keeps_the_case_and_worst_element(causal_bug_report: Any) -> None:
    document = causal_bug_report.document()
    jsonschema.validate(document, schema())
    json.dumps(document, allow_nan=False)  # no NaN or infinity survives as a number
    assert document["version"] == SCHEMA_VERSION and document["command"] == "check"
    outcomes = {o["name"]: o for o in document["suites"][0]["properties"]}
    failed = outcomes[CAUSAL_BUG.catches]
    assert failed["status"] == "fail"
    case, worst = failed["case"], failed["worst"]
    assert case["kind"] == "attention" and case["options"]["causal"] is True
    assert worst["array"] and len(worst["index"]) >= 1
    compared_shape = case["shapes"]["q"][:-1]  # out and weights share the leading dims with q
    assert all(0 <= i < n for i, n in zip(worst["index"], compared_shape, strict=False))
    assert worst["bound"] is None or worst["error"] > worst["bound"]
    assert 1 <= worst["wrong"] <= worst["size"]
    not_run = [o for o in outcomes.values() if o["status"] == "not_run"]
    assert len(not_run) == len(PROPERTIES) - 2
    counts = document["counts"]
    assert counts["fail"] >= 1 and sum(counts.values()) == len(PROPERTIES)


def test_junit_of_the_same_report_parses_and_agrees_with_the_json(causal_bug_report: Any, tmp_path: Path) -> None:
    document = causal_bug_report.document()
    path = tmp_path / "report.xml"
    tree = junit_tree(document)
    tree.write(path, encoding="utf-8", xml_declaration=True)
    root = ElementTree.parse(path).getroot()  # a standard parser reads it
    assert root.tag == "testsuites"
    cases = {case.get("name"): case for case in root.iter("testcase")}
    assert set(cases) == {p.name for p in PROPERTIES}
    failure = cases[CAUSAL_BUG.catches].find("failure")
    assert failure is not None and "elements wrong" in (failure.text or "")
    assert int(root.get("failures", "-1")) == document["counts"]["fail"]
    assert int(root.get("skipped", "-1")) == document["counts"]["not_run"] + document["counts"]["not_applicable"]
    assert root.get("tests") == str(len(PROPERTIES))


def test_an_error_is_a_junit_error_not_a_failure(tmp_path: Path) -> None:
    report = check(_raising_kernel, framework="numpy", properties=("matches_float64_oracle",), max_examples=3,
                   seed=0)
    assert report.outcomes[0].status == Status.ERROR
    jsonschema.validate(report.document(), schema())
    root = junit_tree(report.document()).getroot()
    case = next(c for c in root.iter("testcase") if c.get("name") == "matches_float64_oracle")
    assert case.find("error") is not None and case.find("failure") is None
    assert root.get("errors") == "1" and root.get("failures") == "0"


def test_non_finite_numbers_are_strings() -> None:
    from attention_ref.testing.report import PropertyOutcome
    from attention_ref.testing.report_files import Suite

    worst = {"array": "lse", "index": [0], "got": float("nan"), "expected": -np.inf, "error": float("nan"),
             "bound": None, "wrong": 1, "size": 1}
    outcome = PropertyOutcome("matches_float64_oracle", (10,), Status.FAIL, "x", worst=worst)
    document = report_document("check", [Suite("k", [outcome])], seed=None, max_examples=1, seconds=0.0)
    jsonschema.validate(document, schema())
    got = document["suites"][0]["properties"][0]["worst"]
    assert (got["got"], got["expected"]) == ("nan", "-inf")


def test_cli_verify_selects_by_rule_and_writes_both_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    json_path, junit_path = tmp_path / "out" / "verify.json", tmp_path / "verify.xml"
    assert main(["verify", "--backend", "numpy", "--rules", "3,4", "--max-examples", "3", "--seed", "0",
                 "--json", str(json_path), "--junit-xml", str(junit_path), "--progress", "none"]) == 0
    document = json.loads(json_path.read_text())
    jsonschema.validate(document, schema())
    statuses = {o["name"]: o["status"] for o in document["suites"][0]["properties"]}
    chosen = {p.name for p in PROPERTIES if {3, 4} & set(p.rules)}
    assert chosen and all(statuses[name] == "pass" for name in chosen)
    assert all(status == "not_run" for name, status in statuses.items() if name not in chosen)
    assert ElementTree.parse(junit_path).getroot().get("tests") == str(len(PROPERTIES))
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"{len(chosen)} passed")


def test_rules_and_property_selection_combine_and_unknown_rules_are_refused() -> None:
    rule3 = [p for p in PROPERTIES if 3 in p.rules]
    report = check(CAUSAL_BUG.kernel, framework="torch", supports=CAUSAL_BUG.supports, max_examples=2, seed=0,
                   rules=(3,), properties=(rule3[0].name, CAUSAL_BUG.catches))
    ran = [o.name for o in report.outcomes if o.status.counted or o.status == Status.NOT_APPLICABLE]
    assert ran == [rule3[0].name]  # CAUSAL_BUG.catches proves rule 7, not 3
    with pytest.raises(ValueError, match="no property proves rule"):
        check(CAUSAL_BUG.kernel, framework="torch", rules=(99,))


def test_check_workers_give_the_serial_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "offbyone.py").write_text(
        "import numpy as np\n"
        "def attention(q, k, v, causal=False):\n"
        "    s = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])\n"
        "    if causal:\n"
        "        L, S = s.shape[-2:]\n"
        "        s = np.where(np.arange(S) <= np.arange(L)[:, None] + 1, s, -np.inf)\n"
        "    w = np.exp(s - s.max(-1, keepdims=True))\n"
        "    return (w / w.sum(-1, keepdims=True)) @ v\n")
    argv = ["check", "offbyone:attention", "--framework", "numpy", "--supports", "causal", "--max-examples", "20",
            "--seed", "0", "--rules", "7,10", "--progress", "none"]
    serial = main([*argv, "--workers", "1", "--json", "serial.json"]), capsys.readouterr().out
    parallel = main([*argv, "--workers", "2", "--json", "parallel.json"]), capsys.readouterr().out
    assert serial == parallel and serial[0] == 1
    assert "FAIL" in serial[1]

    def without_times(path: str) -> Any:
        document = json.loads((tmp_path / path).read_text())
        for suite in document["suites"]:
            suite["seconds"] = 0
            for outcome in suite["properties"]:
                outcome["seconds"] = 0
        document["seconds"] = 0
        return document

    assert without_times("serial.json") == without_times("parallel.json")


def test_progress_is_quiet_off_a_terminal_and_lines_on_request() -> None:
    assert type(make_progress("auto", io.StringIO())) is Progress  # not a TTY: nothing shown
    stream = io.StringIO()
    lines = make_progress("lines", stream)
    assert isinstance(lines, LineProgress)
    report = check(CAUSAL_BUG.kernel, framework="torch", supports=CAUSAL_BUG.supports, seed=0, max_examples=5,
                   properties=("matches_float64_oracle", CAUSAL_BUG.catches), progress=lines)
    shown = stream.getvalue().splitlines()
    ran = [o for o in report.outcomes if o.status.counted]
    assert [line.split(":")[0] for line in shown] == [f"{report.name} {o.name}" for o in ran]
    with pytest.raises(ValueError, match="progress must be one of"):
        make_progress("loud")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_counts_properties_and_examples() -> None:
    import_or_skip("rich")
    bar = make_progress("auto", _Terminal())
    assert isinstance(bar, BarProgress)
    examples: list[int] = []
    original = bar.example

    def counting() -> None:
        original()
        examples.append(1)

    bar.example = counting  # type: ignore[method-assign]
    with bar:
        check(_numpy_reference, framework="numpy", supports=("causal",), seed=0, max_examples=4,
              properties=("matches_float64_oracle",), progress=bar)
        task = bar._bar.tasks[0]
        assert (task.completed, task.total) == (1, 1)
    assert 1 <= len(examples) <= 4


def test_status_names_cover_every_status() -> None:
    assert set(STATUS_NAMES) == set(Status)
    assert set(STATUS_NAMES.values()) == set(schema()["$defs"]["counts"]["required"])


def test_a_worker_that_dies_is_an_error_of_its_property_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A kernel that kills its process on causal inputs: with workers, the property that always passes
    causal is an ERROR; the two that never do, which were running or waiting beside it, pass."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dies.py").write_text(
        "import os\n"
        "import attention_ref as ar\n"
        "def attention(q, k, v, causal=False):\n"
        "    if causal:\n"
        "        os._exit(3)\n"
        "    return ar.attention(q, k, v, backend='numpy')\n")
    chosen = ("key_permutation_invariance", "query_permutation_equivariance", "causal_ignores_future_keys")
    status = main(["check", "dies:attention", "--framework", "numpy", "--supports", "causal", "--max-examples", "5",
                   "--seed", "0", "--workers", "2", "--progress", "none", "--json", "dies.json",
                   *(f"--property={name}" for name in chosen)])
    assert status == 1
    document = json.loads((tmp_path / "dies.json").read_text())
    jsonschema.validate(document, schema())
    statuses = {o["name"]: o["status"] for o in document["suites"][0]["properties"] if o["name"] in chosen}
    assert statuses == {"key_permutation_invariance": "pass", "query_permutation_equivariance": "pass",
                        "causal_ignores_future_keys": "error"}
    assert "died" in capsys.readouterr().out


def test_junit_escapes_what_xml_forbids() -> None:
    """A worker's stderr or a kernel's message may hold control characters (terminal colours, NUL)."""
    from attention_ref.testing.report import PropertyOutcome
    from attention_ref.testing.report_files import Suite

    detail = "RuntimeError: \x1b[31mred\x1b[0m and a NUL \x00\nsecond line"
    outcome = PropertyOutcome("matches_float64_oracle", (10,), Status.ERROR, detail)
    document = report_document("check", [Suite("k\x07", [outcome], description="d\x01")], seed=None,
                               max_examples=1, seconds=0.0)
    text = ElementTree.tostring(junit_tree(document).getroot(), encoding="unicode")
    error = ElementTree.fromstring(text).find("testsuite/testcase/error")  # parses
    assert error is not None and "\\x1b[31mred" in (error.text or "") and "\\x00" in (error.text or "")
