"""Every conformance property of SPEC.md on every backend (each property names its rules)."""

from __future__ import annotations

import pytest

import attention_ref as ar
from attention_ref.testing import PROPERTIES, run_property

from .conftest import BACKENDS


@pytest.mark.parametrize("prop", PROPERTIES, ids=lambda p: f"{p.name}-rules_{'_'.join(map(str, p.rules))}")
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_property(backend_name: str, prop: object) -> None:
    run_property(prop, ar.get_backend(backend_name))


def test_every_spec_rule_has_a_property() -> None:
    covered = {rule for prop in PROPERTIES for rule in prop.rules}
    assert covered == set(range(1, 15))
