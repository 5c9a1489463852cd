"""``attention-ref verify``: run every conformance property against every installed backend."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..registry import available_backends, get_backend


@dataclass
class VerifyReport:
    """Outcome per (property, backend): None when it passed, else the failure text."""

    backends: list[str]
    properties: list[tuple[str, tuple[int, ...]]]
    failures: dict[tuple[str, str], str | None] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def passed(self) -> int:
        return sum(1 for failure in self.failures.values() if failure is None)

    @property
    def failed(self) -> int:
        return len(self.failures) - self.passed

    def render(self) -> str:
        name_width = max(len("property"), *(len(name) for name, _ in self.properties))
        rules_width = max(len("rules"), *(len(_rules(rules)) for _, rules in self.properties))
        widths = [max(4, len(b)) for b in self.backends]
        lines = ["  ".join(["property".ljust(name_width), "rules".ljust(rules_width),
                            *(b.ljust(w) for b, w in zip(self.backends, widths))])]
        for name, rules in self.properties:
            cells = ["pass" if self.failures[(name, b)] is None else "FAIL" for b in self.backends]
            lines.append("  ".join([name.ljust(name_width), _rules(rules).ljust(rules_width),
                                    *(c.ljust(w) for c, w in zip(cells, widths))]))
        for (name, backend), failure in self.failures.items():
            if failure is not None:
                lines += ["", f"FAILED {name} on {backend}:", failure]
        lines += ["", f"{self.passed} passed, {self.failed} failed ({self.seconds:.1f} s)"]
        return "\n".join(line.rstrip() for line in lines)


def _rules(rules: tuple[int, ...]) -> str:
    return ",".join(str(r) for r in rules)


def verify(
    backends: Sequence[str] | None = None, *, max_examples: int = 50, seed: int | None = None
) -> VerifyReport:
    """Run every property of ``attention_ref.testing.PROPERTIES`` on each backend (default: all
    installed) with ``max_examples`` Hypothesis examples each."""
    from hypothesis import HealthCheck, settings

    from . import PROPERTIES, run_property
    from .check import describe_failure

    names = list(backends) if backends else available_backends()
    run_settings = settings(max_examples=max_examples, deadline=None, database=None, print_blob=True,
                            suppress_health_check=[HealthCheck.too_slow])
    report = VerifyReport(names, [(p.name, p.rules) for p in PROPERTIES])
    start = time.perf_counter()
    for backend_name in names:
        impl = get_backend(backend_name)
        for prop in PROPERTIES:
            try:
                run_property(prop, impl, run_settings, seed=seed)
            except Exception as error:  # noqa: BLE001 - every failure goes in the report
                report.failures[(prop.name, backend_name)] = describe_failure(error)
            else:
                report.failures[(prop.name, backend_name)] = None
    report.seconds = time.perf_counter() - start
    return report
