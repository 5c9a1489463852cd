"""Testing tools: attention cases, Hypothesis strategies, the conformance properties of SPEC.md, the
tolerance rules (``assert_attention_close``, ``assert_gradients_close``), the catalogue of bad inputs, the kernel checker
(``attention_ref.testing.check``) and the framework crosscheck (``attention_ref.testing.crosscheck``). Needs the ``verify`` (or ``test``) extra: hypothesis and ml_dtypes."""

from .bad_inputs import BAD_INPUTS, BadInput, check_bad_inputs
from .cases import AttentionCase, call, call_vjp
from .profiles import register_profiles
from .properties import (
    PROPERTIES,
    Property,
    assert_attention_close,
    assert_gradients_close,
    get_property,
    run_property,
)
from .strategies import attention_cases

__all__ = [
    "BAD_INPUTS",
    "PROPERTIES",
    "AttentionCase",
    "BadInput",
    "Property",
    "assert_attention_close",
    "assert_gradients_close",
    "attention_cases",
    "call",
    "call_vjp",
    "check_bad_inputs",
    "get_property",
    "register_profiles",
    "run_property",
]
