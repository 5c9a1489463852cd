"""One property run turned into its ``PropertyOutcome``, the same way in ``check``, ``check_layer``
and ``verify``: timed, its progress reported, a FAIL or ERROR described by ``failure_outcome``, a
pass given a declared convention reported with its evidence, and a picture of a FAIL made when
asked for."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable

from .progress import Progress
from .report import PropertyOutcome, Status, failure_outcome


def outcome_of(name: str, rules: tuple[int, ...], run: Callable[[], None], *, target: str, progress: Progress,
               observed: Counter[str] | None = None,
               picture: Callable[[BaseException], str | None] | None = None) -> PropertyOutcome:
    """Run ``run()`` (one property on one target) and return its outcome.

    An exception is a FAIL or ERROR (``failure_outcome``); for a FAIL, ``picture(error)`` (when given)
    makes its PNG and returns the path (or None when there is nothing to draw); if making it raises,
    the outcome stays a FAIL and its detail says why there is no picture. Without an exception, the
    outcome is "convention differs" with the evidence when ``observed`` (the declared conventions
    exercised, with counts, cleared here before the run) is not empty, else pass. ``seconds`` is the
    run's wall time; ``progress`` gets ``start`` and ``end``."""
    if observed is not None:
        observed.clear()
    progress.start(target, name)
    began = time.perf_counter()
    try:
        run()
    except Exception as error:  # every failure and error goes in the report
        outcome = failure_outcome(name, rules, error)
        if picture is not None and outcome.status == Status.FAIL:
            try:
                outcome = dataclasses.replace(outcome, picture=picture(error))
            except Exception as picture_error:  # the finding stands; only its picture is missing
                outcome = dataclasses.replace(outcome, detail=f"{outcome.detail}\npicture: not made "
                                                              f"({type(picture_error).__name__}: {picture_error})")
    else:
        if observed:  # passed given a declared convention, which was exercised and verified
            evidence = "\n".join(f"{what} [{count} rows]" for what, count in observed.items())
            outcome = PropertyOutcome(name, rules, Status.CONVENTION_DIFFERS, evidence)
        else:
            outcome = PropertyOutcome(name, rules, Status.PASS)
    seconds = time.perf_counter() - began
    outcome = dataclasses.replace(outcome, seconds=seconds)
    progress.end(target, outcome, seconds)
    return outcome
