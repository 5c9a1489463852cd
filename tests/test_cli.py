"""``attention-ref verify``: a table with a row per property and a column per backend."""

from __future__ import annotations

import re

import pytest

import attention_ref as ar
from attention_ref import registry
from attention_ref.cli import main
from attention_ref.testing import PROPERTIES

from .buggy_backends import CausalOffByOne


def test_verify_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", "--backend", "numpy", "--max-examples", "5", "--seed", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["property", "rules", "numpy"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:1 + len(PROPERTIES)]}
    assert set(rows) == {p.name for p in PROPERTIES}
    assert all(cells[-1] == "pass" for cells in rows.values())
    assert re.fullmatch(rf"{len(PROPERTIES)} passed, 0 failed \(\d+\.\d s\)", lines[-1])


def test_verify_reports_failures(capsys: pytest.CaptureFixture[str]) -> None:
    ar.register_backend("causal_off_by_one", CausalOffByOne)
    try:
        status = main(["verify", "--backend", "numpy", "--backend", "causal_off_by_one", "--max-examples", "15",
                       "--seed", "0"])
    finally:
        registry._registered.pop("causal_off_by_one")
        registry._instances.pop("causal_off_by_one", None)
    out = capsys.readouterr().out
    assert status == 1
    row = next(line for line in out.splitlines() if line.startswith("causal_equals_explicit_mask"))
    assert row.split()[-2:] == ["pass", "FAIL"]
    assert "FAILED causal_equals_explicit_mask on causal_off_by_one:" in out
    passed, failed = map(int, re.search(r"(\d+) passed, (\d+) failed", out.splitlines()[-1]).groups())
    assert failed >= 2 and passed + failed == 2 * len(PROPERTIES)
