"""``attention-ref verify``: a table with a row per property and a column per backend."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

import attention_ref as ar
from attention_ref import registry
from attention_ref.backends.numpy import NumpyBackend
from attention_ref.cli import main
from attention_ref.plan import AttentionPlan
from attention_ref.testing import PROPERTIES


class CausalOffByOne(NumpyBackend):
    """A buggy backend: the causal test is j <= i + offset + 1, so each query also sees the next key."""

    name = "causal_off_by_one"

    def _attention(self, plan: AttentionPlan, q: Any, k: Any, v: Any, mask: Any, bias: Any,
                   dropout_mask: Any) -> tuple[Any, Any, Any]:
        if plan.causal:
            leaky = np.arange(plan.kv_len) <= np.arange(plan.q_len)[:, None] + plan.causal_offset + 1
            mask = leaky if mask is None else mask & leaky
            plan = AttentionPlan(**{**plan.__dict__, "causal": False, "has_mask": True})
        return super()._attention(plan, q, k, v, mask, bias, dropout_mask)


def test_verify_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", "--backend", "numpy", "--max-examples", "5", "--seed", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["property", "rules", "numpy"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:1 + len(PROPERTIES)]}
    assert set(rows) == {p.name for p in PROPERTIES}
    assert all(cells[-1] == "pass" for cells in rows.values())
    assert re.fullmatch(rf"{len(PROPERTIES)} passed, 0 failed, 0 errors \(\d+\.\d s\)", lines[-1])


def test_verify_reports_failures(capsys: pytest.CaptureFixture[str]) -> None:
    ar.register_backend("causal_off_by_one", CausalOffByOne)
    chosen = ("matches_float64_oracle", "causal_equals_explicit_mask")
    try:
        status = main(["verify", "--backend", "numpy", "--backend", "causal_off_by_one", "--max-examples", "15",
                       "--seed", "0", *(f"--property={name}" for name in chosen)])
    finally:
        registry._registered.pop("causal_off_by_one")
        registry._instances.pop("causal_off_by_one", None)
    out = capsys.readouterr().out
    assert status == 1
    rows = {line.split()[0]: line.split()[-2:] for line in out.splitlines()[1:1 + len(PROPERTIES)]}
    assert rows["causal_equals_explicit_mask"] == ["pass", "FAIL"]
    assert rows["matches_float64_oracle"] == ["pass", "FAIL"]
    assert all(cells == ["not", "run"] for name, cells in rows.items() if name not in chosen)
    assert "FAIL causal_equals_explicit_mask on causal_off_by_one:" in out
    assert out.splitlines()[-1].startswith("2 passed, 2 failed, 0 errors")


def test_verify_refuses_an_unknown_property() -> None:
    with pytest.raises(ValueError, match="unknown properties"):
        main(["verify", "--backend", "numpy", "--property", "no_such_property"])
