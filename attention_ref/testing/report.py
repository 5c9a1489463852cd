"""The one report model of ``check``, ``verify`` and ``crosscheck``: a status per property run, one
table renderer and one summary line.

A property run ends in one :class:`Status`. FAIL and ERROR are distinct, as in pytest: FAIL means the
property's assertion did not hold (a finding about the implementation under test); ERROR means the
property could not run (a bug in the checker, a kernel that raised on an input within its declared
features, a calling-convention mismatch such as a wrong number of returned values).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


class Status(enum.StrEnum):
    """The outcome of one property on one implementation (its value is what tables print)."""

    PASS = "pass"
    FAIL = "FAIL"
    ERROR = "ERROR"
    #: Passed given a declared convention, which was exercised and verified (the evidence is kept).
    CONVENTION_DIFFERS = "convention differs"
    #: The implementation lacks a feature the property needs.
    NOT_APPLICABLE = "n/a"
    #: Skipped on request (``fail_fast`` after a failure, or not among the selected properties).
    NOT_RUN = "not run"

    @property
    def counted(self) -> bool:
        """Whether the property ran (pass, FAIL, ERROR or convention differs)."""
        return self not in (Status.NOT_APPLICABLE, Status.NOT_RUN)

    @property
    def ok(self) -> bool:
        """Whether the outcome lets a report pass."""
        return self not in (Status.FAIL, Status.ERROR)


@dataclass(frozen=True)
class PropertyOutcome:
    """One property's outcome: its name, the SPEC.md rules it proves, the status and, for FAIL and
    ERROR, the shrunk failing case (for convention differs, the evidence) in ``detail``.

    For a FAIL or ERROR, ``case`` is the shrunk case as plain values (``case_record``; None when the
    property draws no case) and ``worst`` the worst element of a failed comparison
    (``ElementMismatch.worst_element``; None when the failure was not one). ``picture`` is the path
    of its PNG when pictures were asked for and made; ``seconds`` the property's wall time."""

    name: str
    rules: tuple[int, ...]
    status: Status
    detail: str = ""
    case: dict[str, Any] | None = None
    worst: dict[str, Any] | None = None
    picture: str | None = None
    seconds: float = 0.0


def summary_line(statuses: Iterable[Status]) -> str:
    """``N passed, N failed, N errors`` (with ``N convention differs`` after passed when there are any)."""
    counts = {status: 0 for status in Status}
    for status in statuses:
        counts[status] += 1
    parts = [f"{counts[Status.PASS]} passed"]
    if counts[Status.CONVENTION_DIFFERS]:
        parts.append(f"{counts[Status.CONVENTION_DIFFERS]} convention differs")
    parts += [f"{counts[Status.FAIL]} failed", f"{counts[Status.ERROR]} errors"]
    return ", ".join(parts)


def render_table(header: Sequence[str], rows: Iterable[Sequence[str]], *, min_width: int = 0) -> list[str]:
    """Left-aligned columns two spaces apart, each as wide as its widest cell (and ``min_width``)."""
    rows = [list(row) for row in rows]
    widths = [max(min_width, len(title), *(len(row[i]) for row in rows)) for i, title in enumerate(header)]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in [list(header), *rows]]


def rules_text(rules: tuple[int, ...]) -> str:
    return ",".join(str(rule) for rule in rules)


def failure_sections(outcomes: Iterable[tuple[str, PropertyOutcome]]) -> list[str]:
    """The detail of every FAIL, ERROR and convention differs, each headed ``STATUS name[ where]:``,
    and the path of its picture when one was made."""
    lines: list[str] = []
    for where, outcome in outcomes:
        if outcome.detail:
            lines += ["", f"{outcome.status} {outcome.name}{where}:", outcome.detail]
            if outcome.picture:
                lines.append(f"picture: {outcome.picture}")
    return lines


def _leaves(error: BaseException) -> list[BaseException]:
    nested = getattr(error, "exceptions", None)
    if not nested:
        return [error]
    return [leaf for inner in nested for leaf in _leaves(inner)]


def case_record(case: Any) -> dict[str, Any] | None:
    """A drawn case as plain values (JSON-ready): ``case.record()`` where the case has one
    (``AttentionCase``, ``LayerCase``), else its ``repr``; None stays None."""
    if case is None:
        return None
    record = getattr(case, "record", None)
    return record() if callable(record) else {"repr": repr(case)}


def failing_case(error: BaseException) -> Any:
    """The case a failure was found on: the ``ElementMismatch``'s, else the example the runner
    attached (``EXAMPLE_ATTRIBUTE``; its first element when the example is a tuple), else None."""
    case = getattr(error, "case", None)
    if case is not None:
        return case
    example = getattr(error, EXAMPLE_ATTRIBUTE, None)
    return example[0] if isinstance(example, tuple) and example else example


#: The attribute under which ``run_property`` keeps, on a property's exception, the example it failed on.
EXAMPLE_ATTRIBUTE = "attention_ref_example"


def first_failure(error: BaseException) -> BaseException:
    """The error a report shows of ``error`` (possibly a group of Hypothesis failures): the first
    AssertionError, else the first error."""
    leaves = _leaves(error)
    return next((leaf for leaf in leaves if isinstance(leaf, AssertionError)), leaves[0])


def failure_outcome(name: str, rules: tuple[int, ...], error: BaseException) -> PropertyOutcome:
    """The outcome of a property that raised ``error`` (possibly a group of Hypothesis failures).

    FAIL when one of the errors is an AssertionError (the property's assertion), ERROR otherwise (the
    first line of every other non-assertion error is listed after the detail). The detail is that
    error's message, which shows the shrunk case (in full when small) and the other
    values drawn with it; Hypothesis' long reprint of the example is left out (the same seed
    reproduces the run).
    """
    leaves = _leaves(error)
    assertions = [leaf for leaf in leaves if isinstance(leaf, AssertionError)]
    status = Status.FAIL if assertions else Status.ERROR
    first = (assertions or leaves)[0]
    notes = [note for note in getattr(first, "__notes__", [])  # the drawn extras; the packed/paged call compared
             if note.startswith("drawn with the case") or re.match(r"(\w+ \d+ of )?the (packed|paged) case: ", note)]
    others = [f"also raised (another example): {type(leaf).__name__}: {str(leaf).splitlines()[0] if str(leaf) else ''}"
              for leaf in leaves if leaf is not first and not isinstance(leaf, AssertionError)]
    worst_element = getattr(first, "worst_element", None)
    return PropertyOutcome(name, rules, status, "\n".join([f"{type(first).__name__}: {first}", *notes, *others]),
                           case=case_record(failing_case(first)),
                           worst=worst_element() if callable(worst_element) else None)
