"""``attention-ref verify``: run every conformance property against every installed backend."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings

from ..registry import available_backends, get_backend
from .report import PropertyOutcome, Status, failure_outcome, failure_sections, render_table, rules_text, summary_line
from .runner import PROPERTIES, check_property_names, run_property


@dataclass
class VerifyReport:
    """Per backend, an outcome for every property of ``PROPERTIES`` (in their order)."""

    backends: list[str]
    outcomes: dict[str, list[PropertyOutcome]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        """No property failed or errored on any backend."""
        return all(o.status.ok for outcomes in self.outcomes.values() for o in outcomes)

    def summary(self) -> str:
        return summary_line(o.status for outcomes in self.outcomes.values() for o in outcomes)

    def render(self) -> str:
        columns = [self.outcomes[name] for name in self.backends]
        rows = [(first.name, rules_text(first.rules), *(column[i].status for column in columns))
                for i, first in enumerate(columns[0])] if columns else []
        lines = render_table(("property", "rules", *self.backends), rows, min_width=4)
        lines += failure_sections((f" on {name}", o) for name in self.backends for o in self.outcomes[name])
        return "\n".join([*lines, "", f"{self.summary()} ({self.seconds:.1f} s)"])

    __str__ = render


def verify(
    backends: Sequence[str] | None = None,
    *,
    max_examples: int = 50,
    seed: int | None = None,
    properties: Sequence[str] | None = None,
) -> VerifyReport:
    """Run every property of ``attention_ref.testing.PROPERTIES`` on each backend (default: all
    installed) with ``max_examples`` Hypothesis examples each; ``properties`` names the ones to run
    (default: all; the others are reported "not run")."""
    check_property_names(properties)
    names = list(backends) if backends else available_backends()
    run_settings = settings(max_examples=max_examples, deadline=None, database=None, print_blob=True,
                            suppress_health_check=[HealthCheck.too_slow])
    report = VerifyReport(names)
    start = time.perf_counter()
    for backend_name in names:
        impl = get_backend(backend_name)
        outcomes = report.outcomes.setdefault(backend_name, [])
        for prop in PROPERTIES:
            if properties is not None and prop.name not in properties:
                outcomes.append(PropertyOutcome(prop.name, prop.rules, Status.NOT_RUN))
                continue
            try:
                run_property(prop, impl, run_settings, seed=seed)
            except Exception as error:  # every failure and error goes in the report
                outcomes.append(failure_outcome(prop.name, prop.rules, error))
            else:
                outcomes.append(PropertyOutcome(prop.name, prop.rules, Status.PASS))
    report.seconds = time.perf_counter() - start
    return report
