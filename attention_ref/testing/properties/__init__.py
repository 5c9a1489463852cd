"""The conformance properties of SPEC.md, each written once as a function of a
:class:`~attention_ref.testing.implementation.Subject` (an implementation: our backends, or an
adapter around someone else's kernel) and naming the rules it proves.

One module per rule, imported here in rule order so that ``PROPERTIES``
(``attention_ref.testing.runner``) lists them in that order; a property proving several rules is in
the module of its main rule. First comes the agreement with the float64 oracle, which every rule's
cases go through:

* ``oracle``: ``matches_float64_oracle`` (rules 1-7 and 10);
* ``rule01_layout``: permutations and batch dims;
* ``rule02_gqa``: grouped-query attention;
* ``rule03_scale``: the default, zero, homogeneous and large scales;
* ``rule04_softcap``; ``rule05_bias``;
* ``rule07_causal_and_windows``: causal and sliding windows (rule 6, the mask, has no property of its
  own: the oracle's cases and the explicit masks of rules 7 and 8 exercise it, and rule 12 its errors);
* ``rule08_exclusion``: excluded keys and fully excluded rows;
* ``rule09_stability``; ``rule10_dtypes``; ``rule11_results``; ``rule12_errors``; ``rule13_dropout``;
* ``rule14_gradients``;
* ``rule19_blocked``: results without weights, and the blocked algorithm with any tile;
* ``rule20_varlen``: packed variable-length attention against each segment's own attention and the
  dense call with ``varlen_mask``, the segments' independence, and the gradients (feature ``varlen``);
* ``rule21_paged``: paged KV caches against each sequence's attention on its gathered logical cache,
  and the independence from where the pages are (feature ``paged``);
* ``rule22_mods``: ``mask_mod`` and bias-only or softcap ``score_mod`` against the explicit mask, bias
  and softcap (features ``mask_mod``, ``score_mod``).

Every tolerance comes from ``bounds_for(subject, case)`` (``attention_ref.testing.assertions``): the
derived bound for implementations of SPEC.md, the calibrated rule for other people's kernels
(``subject.calibrated``, set by ``check``). Positions the spec fixes exactly (excluded keys, fully
excluded rows, values that must not change) are compared exactly.
"""

from __future__ import annotations

from . import (
    oracle,
    rule01_layout,
    rule02_gqa,
    rule03_scale,
    rule04_softcap,
    rule05_bias,
    rule07_causal_and_windows,
    rule08_exclusion,
    rule09_stability,
    rule10_dtypes,
    rule11_results,
    rule12_errors,
    rule13_dropout,
    rule14_gradients,
    rule19_blocked,
    rule20_varlen,
    rule21_paged,
    rule22_mods,
)

__all__ = [
    "oracle",
    "rule01_layout",
    "rule02_gqa",
    "rule03_scale",
    "rule04_softcap",
    "rule05_bias",
    "rule07_causal_and_windows",
    "rule08_exclusion",
    "rule09_stability",
    "rule10_dtypes",
    "rule11_results",
    "rule12_errors",
    "rule13_dropout",
    "rule14_gradients",
    "rule19_blocked",
    "rule20_varlen",
    "rule21_paged",
    "rule22_mods",
]
