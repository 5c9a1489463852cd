"""The built-in targets as a worker builds them: listing them on the CPU imports no framework (each
worker imports only its own), every target names the builder that made it again, and the keras
targets carry the environment that picks keras' backend."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

LIST_TARGETS = """
import json, sys
from attention_ref.testing.adapters import available_targets, find_target
targets = available_targets("cpu")
again = [find_target(t.name, "cpu", t.builder).name for t in targets]
imported = sorted(m for m in ("torch", "jax", "flax", "keras") if m in sys.modules)
print(json.dumps({"targets": [[t.name, t.framework, t.builder, dict(t.environment)] for t in targets],
                  "again": again, "imported": imported}))
"""


def test_targets_are_listed_without_importing_a_framework() -> None:
    run = subprocess.run([sys.executable, "-c", LIST_TARGETS], capture_output=True, text=True, timeout=120,
                         check=False)
    assert run.returncode == 0, run.stderr
    listed = json.loads(run.stdout)
    assert listed["imported"] == []
    names = [name for name, _, _, _ in listed["targets"]]
    assert listed["again"] == names
    by_name = {name: (framework, builder, environment) for name, framework, builder, environment in listed["targets"]}
    if "torch.sdpa[MATH]" in by_name:
        assert by_name["torch.sdpa[MATH]"] == ("torch", "attention_ref.testing.adapters:torch_targets", {})
    keras = {name: value for name, value in by_name.items() if name.startswith("keras.")}
    for name, (framework, builder, environment) in keras.items():
        assert builder == "attention_ref.testing.adapters:keras_targets"
        assert environment == {"KERAS_BACKEND": framework}, name
    if keras:
        assert set(keras) <= {"keras.ops.dot_product_attention[jax]", "keras.ops.dot_product_attention[torch]",
                              "keras.ops.dot_product_attention[torch, bias]"}


def test_an_unknown_target_or_device_is_refused() -> None:
    from attention_ref.testing.adapters import available_targets, find_target

    with pytest.raises(LookupError, match="makes no target 'nope'"):
        find_target("nope", "cpu", "attention_ref.testing.adapters:torch_targets")
    with pytest.raises(ValueError, match="device"):
        available_targets("tpu")
