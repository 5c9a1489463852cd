"""``attention-ref check --workers N``: the properties of one check spread over N processes.

Each worker process (``spawn``, so that no framework state is inherited) loads the kernel once from
its ``MODULE:NAME`` (and the backward, when given), with the parent's current directory first on
``sys.path`` as ``check`` has it, and then runs one property per task: ``check`` with
``properties=(name,)`` and the parent's options. Every property runs exactly as in a serial check
(same seed, settings, features and dtypes: the draws of one property do not depend on another), so
the report is the same whatever N; only the order in which properties finish differs. The parent
builds the report's header with a check that runs nothing, then puts each property's outcome in
its place. A worker that dies makes its property an ERROR, never a FAIL.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

from .check import CheckReport, check
from .progress import Progress, as_progress
from .report import PropertyOutcome, Status
from .runner import PROPERTIES, check_property_names, check_rule_numbers, selects
from .targets import current_directory_on_path, load_target

_worker_kernel: dict[str, Any] = {}


def _load(target: str, backward: str | None, directory: str) -> None:
    """A worker's initializer: its kernel (and backward) loaded once, ``directory`` first on the path."""
    os.chdir(directory)
    with current_directory_on_path():
        _worker_kernel["fn"] = load_target(target)
        _worker_kernel["backward"] = None if backward is None else load_target(backward)


def _run_one(name: str, options: dict[str, Any]) -> PropertyOutcome:
    """One property of the worker's kernel (``check`` with ``properties=(name,)``)."""
    with current_directory_on_path():
        report = check(_worker_kernel["fn"], backward=_worker_kernel["backward"], properties=(name,), **options)
    return next(outcome for outcome in report.outcomes if outcome.name == name)


def check_in_workers(target: str, *, workers: int, backward: str | None = None,
                     properties: Sequence[str] | None = None, rules: Sequence[int] | None = None,
                     progress: Progress | None = None, **options: Any) -> CheckReport:
    """``check`` of the kernel ``target`` (``MODULE:NAME``) with its properties spread over ``workers``
    processes (``workers == 1``: in this process). ``options`` are ``check``'s other keywords
    (framework, supports, dtypes, seed, max_examples, plot_dir...); ``name`` defaults to ``target``."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    check_property_names(properties)
    check_rule_numbers(rules)
    options.setdefault("name", target)
    with current_directory_on_path():
        kernel = load_target(target)
        backward_fn = None if backward is None else load_target(backward)
        if workers == 1:
            return check(kernel, backward=backward_fn, properties=properties, rules=rules, progress=progress,
                         **options)
        report = check(kernel, backward=backward_fn, properties=(), **options)  # the header, nothing run
    shown = as_progress(progress)
    chosen = [p.name for p in PROPERTIES if selects(p.name, p.rules, properties, rules)]
    shown.plan(len(chosen))
    outcomes = {outcome.name: outcome for outcome in report.outcomes}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, max(1, len(chosen))), mp_context=context, initializer=_load,
                             initargs=(target, backward, os.getcwd())) as pool:
        running: dict[Future[PropertyOutcome], str] = {pool.submit(_run_one, name, options): name for name in chosen}
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                name = running.pop(future)
                prop = next(p for p in PROPERTIES if p.name == name)
                try:
                    outcome = future.result()
                except Exception as error:  # the worker broke or died: the checker's failure, an ERROR
                    outcome = PropertyOutcome(name, prop.rules, Status.ERROR,
                                              f"the check's worker process failed: {type(error).__name__}: {error}")
                outcomes[name] = outcome
                shown.end(report.name, outcome, outcome.seconds)
    report.outcomes = [outcomes[outcome.name] for outcome in report.outcomes]
    sys.stdout.flush()
    return report
