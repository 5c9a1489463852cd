"""Check a multi-head attention *layer* against the reference layer (SPEC.md "The multi-head attention
layer", "Checking a layer") with the layer properties, in the report of ``check``.

``check_layer(layer, ...)`` takes

* an instance of a framework layer: torch ``nn.MultiheadAttention`` (eval mode; with dropout, the
  dropout properties in train mode with torch's own draw reproduced from a seed), flax
  ``nnx.MultiHeadAttention``, a linen ``MultiHeadDotProductAttention`` as ``(module, variables)``,
  keras ``MultiHeadAttention`` / ``GroupQueryAttention`` or a Hugging Face ``LlamaAttention``. Its
  weights are read with the converter of its type (``attention_ref.layers``), its conventions are
  declared by its adapter (``attention_ref.testing.layer_subjects``), and declaring any for it is a
  ValueError; or
* a factory ``make(params) -> layer`` (``framework`` required): the properties draw
  :class:`~attention_ref.layers.MHAParams` within the declared ``supports``
  (``layer_subjects.LAYER_FEATURES``), pass them as the framework's arrays, and call
  ``layer(query, key, value, **keywords)`` with query ``(B, L, d_q)``, key ``(B, S, d_k)``, value
  ``(B, S, d_v)`` and only the keywords it supports: ``mask`` (in ``mask_layout``, True = attend, or
  True = masked out with ``mask_polarity="ignore"``), ``key_padding_mask`` ``(B, S)`` (True = a real
  token, or padding with ``"ignore"``), ``causal=True``, ``dropout_p`` with ``dropout_mask``
  ``(B, H, L, S)`` (True = keep) and ``return_weights=True``. It returns out ``(B, L, d_out)`` in the
  input dtype, or ``(out, weights)`` when asked for weights (or always, with
  ``returns=("out", "weights")``); weights per head ``(B, H, L, S)`` or averaged ``(B, L, S)``
  (``weights``), before or after dropout (``weights_dropout``). ``fully_masked`` declares what a
  fully masked query row gives: "zero" (the reference: out = bo), "nan", "mean_v" or "skip".

Statuses as ``check``'s: pass; FAIL with the shrunk counterexample; ERROR when a property could not
run (the layer raised on an input within its declared features, returned something outside its
calling convention, or the checker broke); convention differs (a declared convention other than
the reference's was exercised and verified, with the evidence); n/a (the layer lacks what the
property needs); not run.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import hypothesis
from hypothesis import HealthCheck, given
from hypothesis import settings as Settings

from .check import CheckReport
from .draws import defining_modules, pinned_local_constants
from .layer_properties import LAYER_PROPERTIES, LayerProperty, LayerTarget
from .layer_subjects import SubjectOptions, layer_subject
from .outcomes import outcome_of
from .progress import Progress, as_progress
from .report import PropertyOutcome, Status
from .runner import check_rule_numbers, selects


def check_layer_property_names(names: Sequence[str] | None) -> None:
    """ValueError unless every name (None: no selection) is a layer property."""
    unknown = set(names or ()) - {p.name for p in LAYER_PROPERTIES}
    if unknown:
        raise ValueError(f"unknown layer properties {sorted(unknown)}; known: "
                         f"{', '.join(p.name for p in LAYER_PROPERTIES)}")


def run_layer_property(prop: LayerProperty, target: LayerTarget, settings: Settings | None = None,
                       seed: int | None = None, on_example: Callable[[], None] | None = None,
                       local_modules: Sequence[ModuleType] = ()) -> None:
    """Run one layer property with Hypothesis (``settings``, else the current profile);
    ``on_example`` is called after each example (for progress); of Hypothesis' local constants only
    those of ``local_modules`` (the layer's) are drawn (``attention_ref.testing.draws``)."""
    strategy = prop.strategy(target)
    if strategy is None:
        raise ValueError(f"{prop.name} does not apply to {target.subject.name}")

    def test(call: Any) -> None:
        prop.check(target, call)
        if on_example is not None:
            on_example()

    test._hypothesis_internal_add_digest = f"layer:{prop.name}:{target.subject.name}".encode()  # type: ignore[attr-defined]
    wrapped = given(strategy)(test)
    if settings is not None:
        wrapped = settings(wrapped)
    if seed is not None:
        wrapped = hypothesis.seed(seed)(wrapped)
    with pinned_local_constants(local_modules):  # the same cases in every process (testing/draws.py)
        wrapped()



def check_layer(
    layer: Any,
    *,
    framework: str | None = None,
    supports: Sequence[str] | None = None,
    returns: Sequence[str] | None = None,
    weights: str | None = None,
    weights_dropout: str | None = None,
    fully_masked: str | None = None,
    mask_polarity: str | None = None,
    mask_layout: str | None = None,
    dtypes: Sequence[str] = ("float32",),
    max_examples: int = 25,
    seed: int | None = None,
    properties: Sequence[str] | None = None,
    name: str | None = None,
    fail_fast: bool = False,
    rules: Sequence[int] | None = None,
    progress: Progress | None = None,
) -> CheckReport:
    """Run every layer property that applies to ``layer`` (an instance or a factory: see the module
    docstring) in each of ``dtypes`` and report per property (``CheckReport``: ``.passed``,
    ``.outcomes``, ``.render()``). ``properties`` names the ones to run and ``rules`` the SPEC.md
    rules whose properties run (the others: "not run"); ``fail_fast`` stops after the first failure.
    For an instance, ``framework`` may be given and must be its own; the declarations (``supports``
    ... ``mask_layout``) are for factories only. ``progress`` receives the run's events
    (``attention_ref.testing.progress``)."""
    check_layer_property_names(properties)
    check_rule_numbers(rules, LAYER_PROPERTIES)
    shown = as_progress(progress)
    declared: dict[str, Any] = dict(supports=supports, returns=returns, weights=weights,
                                    weights_dropout=weights_dropout, fully_masked=fully_masked,
                                    mask_polarity=mask_polarity, mask_layout=mask_layout)
    given_declarations = {key: value for key, value in declared.items() if value is not None}
    subject = layer_subject(layer, SubjectOptions(framework=framework, name=name, given=given_declarations,
                                                  **declared))
    target = LayerTarget(subject, tuple(dtypes))
    run_settings = Settings(max_examples=max_examples, deadline=None, database=None, print_blob=True,
                            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                                   HealthCheck.data_too_large])
    report = CheckReport(f"{subject.name} ({subject.framework}, {subject.describe()}, dtypes: {', '.join(dtypes)}, "
                         f"{max_examples} examples, seed {seed})", dtypes=tuple(dtypes),
                         name=subject.name, seed=seed, max_examples=max_examples)
    began = time.perf_counter()
    layer_modules = defining_modules(layer)  # their literals are drawn (testing/draws.py)
    shown.plan(sum(selects(p.name, p.rules, properties, rules) and p.applies_to(target) for p in LAYER_PROPERTIES))
    for prop in LAYER_PROPERTIES:
        if (fail_fast and not report.passed) or not selects(prop.name, prop.rules, properties, rules):
            report.outcomes.append(PropertyOutcome(prop.name, prop.rules, Status.NOT_RUN))
            continue
        if not prop.applies_to(target):
            report.outcomes.append(PropertyOutcome(prop.name, prop.rules, Status.NOT_APPLICABLE))
            continue
        report.outcomes.append(outcome_of(
            prop.name, prop.rules,
            functools.partial(run_layer_property, prop, target, run_settings, seed, on_example=shown.example,
                              local_modules=layer_modules),
            target=subject.name, progress=shown, observed=target.observed))
    report.seconds = time.perf_counter() - began
    return report
