"""Testing tools for SPEC.md. Needs the ``verify`` (or ``test``) extra: hypothesis and ml_dtypes.

* ``cases``: ``AttentionCase`` (inputs and options of one call, with its float64 oracle and bounds)
  and ``call``/``call_vjp``, which run an implementation on a case;
* ``strategies``: Hypothesis strategies of cases (``attention_cases``) and the features they draw;
* ``implementation``: the ``Implementation`` protocol the properties run against, and the ``Subject``
  a property receives (the implementation, its features, its tolerance rule);
* ``assertions``: the tolerance rules as assertions (``assert_attention_close``,
  ``assert_gradients_close``, ``assert_matches``...); ``finite_differences``: directional derivatives;
* ``runner``: ``Property``, the registry ``PROPERTIES`` and ``run_property``; ``properties``: the
  conformance properties, one module per rule; ``bad_inputs``: the catalogue of bad inputs (rule 12);
* ``check``: the kernel checker, ``crosscheck``: the framework crosscheck, ``verify``: every property
  on every backend (``attention-ref check``, ``crosscheck``, ``verify``); ``profiles``: Hypothesis
  profiles.

``attention_ref.testing.check`` is the function here (it shadows its module;
``from attention_ref.testing.check import KernelImplementation`` still imports from the module).
"""

from . import _requirements as _requirements  # first: a clear ImportError without hypothesis or ml_dtypes
from . import properties as properties  # registers every property in PROPERTIES, in rule order
from .assertions import assert_attention_close, assert_gradients_close
from .bad_inputs import BAD_INPUTS, BadInput, check_bad_inputs
from .cases import AttentionCase, call, call_vjp
from .check import CheckReport, check
from .crosscheck import CrosscheckReport, crosscheck
from .implementation import Implementation, Subject
from .layer_check import check_layer
from .profiles import register_profiles
from .runner import PROPERTIES, Property, get_property, run_property
from .strategies import attention_cases
from .verify import VerifyReport, verify

__all__ = [
    "BAD_INPUTS",
    "PROPERTIES",
    "AttentionCase",
    "BadInput",
    "CheckReport",
    "CrosscheckReport",
    "Implementation",
    "Property",
    "Subject",
    "VerifyReport",
    "assert_attention_close",
    "assert_gradients_close",
    "attention_cases",
    "call",
    "call_vjp",
    "check",
    "check_bad_inputs",
    "check_layer",
    "crosscheck",
    "get_property",
    "register_profiles",
    "run_property",
    "verify",
]
