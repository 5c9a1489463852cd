"""Every conformance property of SPEC.md on every backend (each property names its rules)."""

from __future__ import annotations

import re

import pytest
from hypothesis import settings

from attention_ref.testing import PROPERTIES, run_property
from attention_ref.testing import properties as property_modules
from attention_ref.testing.runner import Property

from .conftest import BACKENDS, backend_on_device

#: Examples for rule 20's, 21's and 22's properties (the profile's 75 elsewhere): each packed case is a new
#: shape, and each score_mod a new program, which jax compiles; packed attention is dense attention (tested
#: at 75 examples) with a mask, and a mod is a mask or a bias; 25 cases reach every segmentation corner
#: (tests/test_varlen_properties.py counts them) and draw every kind of mod several times.
VARLEN_EXAMPLES = 25
#: The features whose properties run at ``VARLEN_EXAMPLES``.
FEWER_EXAMPLES = {"varlen", "paged", "mask_mod", "score_mod"}


@pytest.mark.parametrize("prop", PROPERTIES, ids=lambda p: f"{p.name}-rules_{'_'.join(map(str, p.rules))}")
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_property(backend_name: str, prop: Property) -> None:
    run_property(prop, backend_on_device(backend_name),
                 settings(max_examples=VARLEN_EXAMPLES) if FEWER_EXAMPLES & prop.requires else None)


def test_every_spec_rule_has_a_property() -> None:
    covered = {rule for prop in PROPERTIES for rule in prop.rules}
    assert covered == set(range(1, 15)) | {19, 20, 21, 22}  # rules 15-18, the layer's, are proved in test_layer*.py


def test_properties_are_registered_by_rule_module_in_rule_order() -> None:
    """The oracle first, then one module per rule: a property of module ``ruleNN_...`` names rule NN,
    and the registry lists the modules in the order of the package (rule order)."""
    order = list(property_modules.__all__)
    rule_numbers = [int(m[4:6]) for m in order if m.startswith("rule")]
    assert order[0] == "oracle" and rule_numbers == sorted(set(rule_numbers))
    modules = [prop.check.__module__.rsplit(".", 1)[-1] for prop in PROPERTIES]
    assert modules == sorted(modules, key=order.index)
    for prop, module in zip(PROPERTIES, modules, strict=True):
        if module.startswith("rule"):
            assert int(module[4:6]) in prop.rules, (prop.name, module)
    for name in order:
        docstring = getattr(property_modules, name).__doc__
        assert re.search(r"rule \d+: ", docstring), name
