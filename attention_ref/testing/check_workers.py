"""``attention-ref check --workers N``: the properties of one check spread over N processes.

Each worker process (``spawn``, so that no framework state is inherited) loads the kernel once from
its ``MODULE:NAME`` (and the backward, when given), with the parent's current directory first on
``sys.path`` as ``check`` has it, and then runs one property per task: ``check`` with
``properties=(name,)`` and the parent's options. Every property runs exactly as in a serial check
(same seed, settings, features and dtypes: the draws of one property do not depend on another), so
the report is the same whatever N; only the order in which properties finish differs. The parent
builds the report's header with a check that runs nothing, then puts each property's outcome in
its place. When a worker dies, the properties it was running or had not started run again, each
alone in a fresh process: only one that kills its process again is an ERROR (never a FAIL).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from .check import CheckReport, check, interface_features, kernel_features
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
    began = time.perf_counter()
    with current_directory_on_path():
        kernel = load_target(target)
        backward_fn = None if backward is None else load_target(backward)
        if workers == 1:
            return check(kernel, backward=backward_fn, properties=properties, rules=rules, progress=progress,
                         **options)
        report = check(kernel, backward=backward_fn, properties=(), **options)  # the header, nothing run
    shown = as_progress(progress)
    features = interface_features(
        kernel_features(options.get("supports", ()), options.get("dtypes", ("float32",)),
                        returns=options.get("returns"), few_shapes=options.get("few_shapes", False)),
        options.get("interface", "dense"), options.get("causal_alignment"))
    outcomes = {outcome.name: outcome for outcome in report.outcomes}
    chosen = []
    for prop in PROPERTIES:
        if selects(prop.name, prop.rules, properties, rules):
            if prop.applies_to(features):
                chosen.append(prop.name)
            else:
                outcomes[prop.name] = PropertyOutcome(prop.name, prop.rules, Status.NOT_APPLICABLE)
    shown.plan(len(chosen))

    def finished(name: str, outcome: PropertyOutcome) -> None:
        outcomes[name] = outcome
        shown.end(report.name, outcome, outcome.seconds)

    pool_options: dict[str, Any] = dict(target=target, backward=backward, options=options)
    for name in _run_pool(chosen, min(workers, max(1, len(chosen))), finished, **pool_options):
        # a worker died while these were running or pending: each again, alone in a fresh process
        if _run_pool([name], 1, finished, **pool_options):
            rules_of = next(p.rules for p in PROPERTIES if p.name == name)
            finished(name, PropertyOutcome(name, rules_of, Status.ERROR,
                                           "the check's worker process died while checking this property "
                                           "(it died again when the property ran alone in a fresh process)"))
    report.outcomes = [outcomes[outcome.name] for outcome in report.outcomes]
    report.seconds = time.perf_counter() - began
    sys.stdout.flush()
    return report


def _run_pool(names: Sequence[str], workers: int, finished: Callable[[str, PropertyOutcome], None], *,
              target: str, backward: str | None, options: dict[str, Any]) -> list[str]:
    """Run the properties ``names`` on ``workers`` spawned processes, giving each outcome to
    ``finished``; the names whose process died (the pool broke while they ran or waited)."""
    broken: list[str] = []
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_load,
                             initargs=(target, backward, os.getcwd())) as pool:
        running: dict[Future[PropertyOutcome], str] = {pool.submit(_run_one, name, options): name for name in names}
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                name = running.pop(future)
                try:
                    outcome = future.result()
                except BrokenProcessPool:
                    broken.append(name)
                    continue
                except Exception as error:  # the worker could not run it: the checker's failure, an ERROR
                    rules = next(p.rules for p in PROPERTIES if p.name == name)
                    outcome = PropertyOutcome(name, rules, Status.ERROR,
                                              f"the check's worker process failed: {type(error).__name__}: {error}")
                finished(name, outcome)
    return [name for name in names if name in broken]
