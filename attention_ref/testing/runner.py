"""The registry of conformance properties and the runner that checks one against an implementation.

A :class:`Property` names the SPEC.md rules it proves, builds a Hypothesis strategy of examples for
the features of an implementation, and has a check that raises AssertionError on a violation.
``attention_property`` registers a check in ``PROPERTIES``; the modules of
``attention_ref.testing.properties`` (one per rule, in rule order) register every property when
imported, which importing ``attention_ref.testing`` does. ``run_property`` runs one property with
Hypothesis against an :class:`~attention_ref.testing.implementation.Implementation`, seen by the
check as a :class:`~attention_ref.testing.implementation.Subject`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import hypothesis
from hypothesis import given
from hypothesis import settings as Settings
from hypothesis import strategies as st

from .draws import pinned_local_constants
from .implementation import Implementation, Subject
from .report import EXAMPLE_ATTRIBUTE
from .strategies import ALL_FEATURES, Features, feature_cases


class CheckerError(Exception):
    """A property's own invariant broke: a bug in attention_ref.testing, not in the implementation
    under test (reported ERROR, never FAIL)."""


@dataclass(frozen=True)
class Property:
    """One property of SPEC.md: ``check(subject, example)`` for examples drawn from
    ``strategy(features)``, or ``check(subject)`` once when the property draws no examples."""

    name: str
    rules: tuple[int, ...]
    description: str
    requires: frozenset[str]
    build: Callable[[Features], st.SearchStrategy[Any] | None] | None
    check: Callable[..., None]

    def strategy(self, features: Features = ALL_FEATURES) -> st.SearchStrategy[Any] | None:
        return None if self.build is None else self.build(features)

    def applies_to(self, features: Features) -> bool:
        """Whether an implementation with these features can be checked by this property."""
        return self.requires <= features.supports and (self.build is None or self.strategy(features) is not None)


#: Every registered property, in registration order (rule order: ``attention_ref.testing.properties``).
PROPERTIES: list[Property] = []


def attention_property(
    name: str,
    rules: tuple[int, ...],
    *,
    cases: dict[str, Any] | None = None,
    extra: tuple[st.SearchStrategy[Any], ...] = (),
    requires: tuple[str, ...] = (),
    strategy: Callable[[Features], st.SearchStrategy[Any] | None] | None = None,
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register ``check`` as a property; its docstring's first line is the description.

    Examples are ``feature_cases(features, **cases)``, followed in a tuple by draws from ``extra``;
    or ``strategy(features)``; with neither, the check runs once without examples. ``requires``
    names the features (``attention_ref.features.SPEC_FEATURES``) it cannot do without.
    """

    def build(features: Features) -> st.SearchStrategy[Any] | None:
        if strategy is not None:
            return strategy(features)
        base = feature_cases(features, **(cases or {}))
        return None if base is None else (st.tuples(base, *extra) if extra else base)

    def register(check: Callable[..., None]) -> Callable[..., None]:
        description = (check.__doc__ or name).strip().splitlines()[0]
        draws = cases is not None or extra or strategy is not None
        PROPERTIES.append(Property(name, rules, description, frozenset(requires), build if draws else None, check))
        return check

    return register


def check_property_names(names: Iterable[str] | None) -> None:
    """ValueError unless every name (None: no selection) is a registered property."""
    unknown = set(names or ()) - {p.name for p in PROPERTIES}
    if unknown:
        raise ValueError(f"unknown properties {sorted(unknown)}")


def check_rule_numbers(rules: Iterable[int] | None, known: Iterable[Any] | None = None) -> None:
    """ValueError unless every rule number (None: no selection) is proved by a property of ``known``
    (default ``PROPERTIES``)."""
    proved = {rule for prop in (PROPERTIES if known is None else known) for rule in prop.rules}
    unknown = sorted(set(rules or ()) - proved)
    if unknown:
        raise ValueError(f"no property proves rule{'s' if len(unknown) > 1 else ''} {unknown}; "
                         f"rules with properties: {sorted(proved)}")


def selects(name: str, rules: tuple[int, ...], properties: Iterable[str] | None,
            rule_numbers: Iterable[int] | None) -> bool:
    """Whether the property ``name`` (proving ``rules``) is selected: named in ``properties`` (None:
    any name) and proving one of ``rule_numbers`` (None: any rule); a property must pass both."""
    return (properties is None or name in properties) and (
        rule_numbers is None or bool(set(rules) & set(rule_numbers)))


def get_property(name: str) -> Property:
    for prop in PROPERTIES:
        if prop.name == name:
            return prop
    raise KeyError(name)


def run_property(
    prop: Property,
    impl: Implementation,
    settings: Settings | None = None,
    seed: int | None = None,
    features: Features = ALL_FEATURES,
    calibrated: bool = False,
    on_example: Callable[[], None] | None = None,
    local_modules: Sequence[ModuleType] = (),
) -> None:
    """Run one property against ``impl`` with Hypothesis (current profile unless ``settings``;
    ``seed`` fixes Hypothesis' random choices), drawing only cases within ``features``; with
    ``calibrated``, ``impl`` is held to the calibrated tolerance rule (other people's kernels).
    ``on_example`` is called after each example (for progress). Of the constants Hypothesis
    collects from local modules, only those of ``local_modules`` (the kernel's) are drawn, so that the
    cases do not depend on what else the process imported (``attention_ref.testing.draws``)."""
    if not prop.applies_to(features):
        raise ValueError(f"{prop.name} does not apply to an implementation supporting {sorted(features.supports)}")
    subject = Subject(impl, features, calibrated)
    strategy = prop.strategy(features)
    if strategy is None:
        prop.check(subject)
        return

    def test(example: Any) -> None:
        try:
            prop.check(subject, example)
            if on_example is not None:
                on_example()
        except Exception as error:  # FAIL or ERROR, the report says which (attention_ref.testing.report)
            if isinstance(example, tuple) and len(example) > 1:  # the case's messages show the case only
                error.add_note(f"drawn with the case: {example[1:]!r}")
            setattr(error, EXAMPLE_ATTRIBUTE, example)  # for the report's case record
            raise

    # Distinct Hypothesis database keys per property and implementation.
    test._hypothesis_internal_add_digest = f"{prop.name}:{impl.name}".encode()  # type: ignore[attr-defined]
    wrapped = given(strategy)(test)
    if settings is not None:
        wrapped = settings(wrapped)
    if seed is not None:
        wrapped = hypothesis.seed(seed)(wrapped)
    with pinned_local_constants(local_modules):  # the same cases in every process
        wrapped()
