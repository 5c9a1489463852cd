"""``attention-ref crosscheck``: every installed framework kernel against SPEC.md, as one matrix.

Each built-in target of ``attention_ref.testing.adapters`` is run through ``check`` with its
declared features and conventions. The matrix has one row per property and one column per target;
a cell is ``pass``, ``FAIL``, ``ERROR`` (the property could not run), ``differs [n,...]`` (passed
given the declared conventions [n,...], which were exercised and verified) or ``n/a`` (the target
lacks a feature the property needs). Under the matrix: each target's declared conventions, the
evidence for every "differs" and the shrunk failing case of every FAIL and ERROR.

The targets run in ``jobs`` worker processes at a time (``attention_ref.testing.crosscheck_worker``),
the slowest first (``Target.cost``); a worker runs one target after another as long as none needs
an environment variable it was not started with (``Target.environment``: keras reads
``KERAS_BACKEND`` once per process, so keras on jax and keras on torch never share a worker). A
worker that crashes or hangs (``timeout``) costs only the target it was running, whose unfinished
properties become ERROR with the end of the worker's stderr; the next target gets a new worker.
The report is in the targets' order whatever ``jobs`` is.

PYTEST_DONT_REWRITE: pytest rewrites the asserts of a plugin's distribution (the ``pytest11``
entry point makes this package one); this module's assertion messages are reported as written.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import pickle
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .adapters import TARGET_BUILDERS, Target, available_targets
from .check import CheckReport
from .crosscheck_worker import DONE
from .progress import Progress, as_progress
from .report import PropertyOutcome, Status, render_table, summary_line
from .report_files import Suite
from .runner import PROPERTIES, check_property_names, check_rule_numbers, selects

#: The dtypes checked by default: float32 on the CPU, half precision too on CUDA.
DEFAULT_DTYPES = {"cpu": ("float32",), "cuda": ("float16", "bfloat16", "float32")}
#: Seconds a target's worker may run by default (start-up included) before it is stopped and its
#: unfinished properties become ERROR, per dtype and per 10 examples (never fewer than this).
DEFAULT_TIMEOUT = 1800.0
#: The lines of a dead worker's stderr (and stdout) that its ERROR outcomes quote.
STDERR_TAIL_LINES = 25
#: Seconds between two looks at a worker's results while it runs (for progress).
POLL_SECONDS = 0.5

#: A matrix cell per status ("convention differs" becomes "differs [n,...]" with its footnotes).
_CELLS = {Status.PASS: "pass", Status.FAIL: "FAIL", Status.ERROR: "ERROR", Status.NOT_APPLICABLE: "n/a",
          Status.NOT_RUN: "-"}


def default_workers() -> int:
    """Worker processes at a time by default: one per available core, at most 4 (each holds a
    framework, about 1 GB with jax)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores))


@dataclass
class CrosscheckReport:
    """Per target, its ``CheckReport`` and the seconds it took."""

    device: str
    results: list[tuple[Target, CheckReport, float]] = field(default_factory=list)
    seed: int | None = None
    max_examples: int | None = None
    dtypes: tuple[str, ...] = ()
    seconds: float = 0.0

    def suites(self) -> list[Suite]:
        """A suite per target, in the targets' order (``report_files``)."""
        return [Suite(target.name, report.outcomes, description=report.target + _unverified(target), seconds=seconds)
                for target, report, seconds in self.results]

    def document(self) -> dict[str, Any]:
        """The JSON document of this report (``report_files.report_document``)."""
        from .report_files import report_document

        return report_document("crosscheck", self.suites(), seed=self.seed, max_examples=self.max_examples,
                               seconds=self.seconds, device=self.device, dtypes=self.dtypes, summary=self.summary())

    @property
    def passed(self) -> bool:
        """No target failed or errored on any property."""
        return all(report.passed for _, report, _ in self.results)

    def summary(self) -> str:
        return summary_line(o.status for _, report, _ in self.results for o in report.outcomes)

    def render(self) -> str:
        if not self.results:
            return f"crosscheck on {self.device}: no framework kernel is installed (pip install torch, jax or flax)"
        from .layer_properties import LAYER_PROPERTIES
        from .layer_targets import LayerTarget

        footnotes: list[str] = []
        kernels = [r for r in self.results if not isinstance(r[0], LayerTarget)]
        layers = [r for r in self.results if isinstance(r[0], LayerTarget)]
        lines: list[str] = []
        for results, known, what in ((kernels, PROPERTIES, "framework kernels"),
                                     (layers, LAYER_PROPERTIES, "framework layers")):
            if results:
                lines += [*(["", ""] if lines else []), *self._matrix(results, [p.name for p in known], what,
                                                                      footnotes)]
        lines += ["", "Declared conventions (exercised by the property):"]
        lines += [f"  [{i}] {text}" for i, text in enumerate(footnotes, 1)]
        for target, report, seconds in self.results:
            lines += ["", f"{target.name} ({target.framework}, {target.layout}, dtypes {', '.join(report.dtypes)}; "
                          f"{report.summary()}, {seconds:.1f} s){_unverified(target)}",
                      f"  supports: {', '.join(target.supports) or 'as the layer declares'}"]
            lines += [f"  note: {note}" for note in target.notes]
            for outcome in report.outcomes:
                if not outcome.status.ok:
                    detail = "\n".join("    " + line for line in outcome.detail.splitlines())
                    lines += [f"  {outcome.status} {outcome.name}:", detail]
                    if outcome.picture:
                        lines.append(f"    picture: {outcome.picture}")
        return "\n".join([*lines, "", self.summary()])

    def _matrix(self, results: list[tuple[Target, CheckReport, float]], known: list[str], what: str,
                footnotes: list[str]) -> list[str]:
        """One matrix: a row per property (``known`` first, in order), a column per target; the
        evidence of every "differs" cell numbered in ``footnotes`` (shared by all matrices)."""
        rows, names, cells = _cells(results, known, footnotes)
        table = [(name, *row) for name, row in zip(rows, cells, strict=True)]
        return [f"crosscheck on {self.device}: {len(names)} {what} against SPEC.md", "",
                *render_table(("property", *names), table, min_width=12)]

    def matrices(self) -> list[tuple[str, list[str], list[str], list[list[str]]]]:
        """The matrices as the table shows them: per kind ("kernels", "layers") with targets, its
        property names, target names and cells (``cells[row][column]``, as printed)."""
        from .layer_properties import LAYER_PROPERTIES
        from .layer_targets import LayerTarget

        footnotes: list[str] = []
        kernels = [r for r in self.results if not isinstance(r[0], LayerTarget)]
        layers = [r for r in self.results if isinstance(r[0], LayerTarget)]
        return [(kind, *_cells(results, [p.name for p in known], footnotes))
                for kind, results, known in (("kernels", kernels, PROPERTIES), ("layers", layers, LAYER_PROPERTIES))
                if results]

    __str__ = render


def _unverified(target: Target) -> str:
    """The mark of a target whose adapter is declared from documentation and was never run (``Target.verified``)."""
    return "" if target.verified else " [not verified: adapter declared from documentation]"


def _cells(results: list[tuple[Target, CheckReport, float]], known: list[str],
           footnotes: list[str]) -> tuple[list[str], list[str], list[list[str]]]:
    """The property names (``known`` first, in order), the target names and the cells of one matrix;
    the evidence of every "differs" cell is numbered in ``footnotes``."""
    columns: list[dict[str, str]] = []
    for _, report, _ in results:
        cells = {}
        for outcome in report.outcomes:
            if outcome.status == Status.CONVENTION_DIFFERS:  # one footnote per line of evidence
                conventions = [re.sub(r" \[\d+ rows\]", "", line) for line in outcome.detail.splitlines()]
                footnotes += [c for c in dict.fromkeys(conventions) if c not in footnotes]
                numbers = ",".join(str(footnotes.index(c) + 1) for c in dict.fromkeys(conventions))
                cells[outcome.name] = f"differs [{numbers}]"
            else:
                cells[outcome.name] = _CELLS[outcome.status]
        columns.append(cells)
    names = [target.name for target, _, _ in results]
    properties = list(dict.fromkeys([*known, *(o.name for _, report, _ in results for o in report.outcomes)]))
    return properties, names, [[cells.get(name, "n/a") for cells in columns] for name in properties]


def _check_names(properties: Sequence[str] | None) -> None:
    """ValueError unless every name is a kernel or a layer property."""
    from .layer_properties import LAYER_PROPERTIES

    known = {p.name for p in PROPERTIES} | {p.name for p in LAYER_PROPERTIES}
    unknown = set(properties or ()) - known
    if unknown:
        check_property_names(sorted(unknown))  # its message lists the kernel properties
        raise ValueError(f"unknown properties {sorted(unknown)}")


def crosscheck(
    *,
    device: str = "cpu",
    dtypes: Sequence[str] | None = None,
    max_examples: int = 10,
    seed: int | None = 0,
    only: Sequence[str] = (),
    properties: Sequence[str] | None = None,
    progress: Progress | Callable[[str], None] | None = None,
    workers: int | None = None,
    timeout: float | None = None,
    builders: Sequence[str] = TARGET_BUILDERS,
    rules: Sequence[int] | None = None,
    plot_dir: str | Path | None = None,
) -> CrosscheckReport:
    """Check every target of ``builders`` available on ``device`` ("cpu" or "cuda"), in each of
    ``dtypes`` it supports (default: all it supports), ``max_examples`` per property. ``only`` keeps
    the targets whose name contains one of its strings (an ``opt_in`` target runs only when named);
    ``properties`` names the properties to run
    and ``rules`` the SPEC.md rules whose properties run (default: all; the others are "not run");
    ``progress`` receives the run's events (a ``Progress``: a note when a target starts and ends, the
    end of each property as its worker reports it; or a callable given the notes). The targets run
    in ``workers`` processes at a time (default ``default_workers()``), each target for at most
    ``timeout`` seconds (default: ``DEFAULT_TIMEOUT`` per dtype and per 10 examples; ``math.inf``: no
    limit). ``plot_dir``: a PNG of every FAIL's shrunk case, and the matrices as ``crosscheck-kernels.png`` and
    ``crosscheck-layers.png``."""
    _check_names(properties)
    from .layer_properties import LAYER_PROPERTIES

    every: list[Any] = [*PROPERTIES, *LAYER_PROPERTIES]
    check_rule_numbers(rules, every)
    if rules is not None:  # the workers get the selection as names
        properties = [p.name for p in every if selects(p.name, p.rules, properties, rules)]
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    shown = as_progress(progress)
    began = time.perf_counter()
    selected: list[tuple[Target, tuple[str, ...]]] = []
    for target in available_targets(device, builders):
        named = bool(only) and any(part in target.name for part in only)
        if (only and not named) or (target.opt_in and not named):
            continue
        chosen = tuple(d for d in target.dtypes if dtypes is None or d in dtypes)
        if chosen:
            selected.append((target, chosen))
    workers = min(workers or default_workers(), max(1, len(selected)))
    # One worker runs the targets in column order; several take the slowest first.
    order = sorted(range(len(selected)), key=lambda i: -selected[i][0].cost if workers > 1 else i)
    shown.plan(sum(planned.status == Status.ERROR for target, chosen in selected
                   for planned in target.plan(chosen, properties)))
    with tempfile.TemporaryDirectory(prefix="attention-ref-crosscheck-") as directory:
        pool = _Pool(directory, device=device, max_examples=max_examples, seed=seed, properties=properties,
                     timeout=timeout, progress=shown, selected=selected, pending=list(order),
                     plot_dir=None if plot_dir is None else str(Path(plot_dir).resolve()))
        threads = [threading.Thread(target=pool.serve, name=f"crosscheck-worker-{n}", daemon=True)
                   for n in range(workers)]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                while thread.is_alive():
                    thread.join(0.2)
        finally:  # interrupted (or done): stop the workers still running, start no other
            pool.stop_all()
            for thread in threads:
                thread.join()
    report = CrosscheckReport(device, seed=seed, max_examples=max_examples,
                              dtypes=tuple(dict.fromkeys(d for _, chosen in selected for d in chosen)))
    for i, (target, chosen) in enumerate(selected):  # a target no thread finished is an ERROR, never left out
        result = pool.results.get(i) or (_dead_worker_report(target, chosen, properties, {}, "was not run", ""), 0.0)
        report.results.append((target, *result))
    report.seconds = time.perf_counter() - began
    if plot_dir is not None:
        for kind, rows, columns, cells in report.matrices():
            try:
                from .pictures import matrix_picture

                matrix_picture(rows, columns, cells, Path(plot_dir) / f"crosscheck-{kind}.png",
                               title=f"crosscheck on {device}: framework {kind} against SPEC.md")
            except Exception as error:  # the report stands; only its picture is missing
                shown.note(f"the {kind} matrix's picture was not made ({type(error).__name__}: {error})")
    return report


class _Worker:
    """A worker process started with one target's environment variables (it runs any target that needs
    no other value of them), and its log file."""

    def __init__(self, environment: tuple[tuple[str, str], ...], log_path: str, shared: dict[str, str]) -> None:
        self.environment = environment
        self.log_path = log_path
        variables = {**shared, **os.environ, **dict(environment),
                     # the worker imports what this process imports (attention_ref, a builder's module)
                     "PYTHONPATH": os.pathsep.join(os.path.abspath(p or os.curdir) for p in sys.path
                                                   if os.path.isdir(p or os.curdir))}
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "attention_ref.testing.crosscheck_worker"],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                            env=variables, start_new_session=True)
        self.answers = b""

    def log_size(self) -> int:
        return os.path.getsize(self.log_path)

    def ask(self, request: dict[str, Any], timeout: float, on_wait: Callable[[], None] | None = None) -> str | None:
        """Send one request and wait for its answer: None when done, else what went wrong (the worker is
        then stopped). ``on_wait`` is called about every ``POLL_SECONDS`` while waiting."""
        assert self.process.stdin is not None and self.process.stdout is not None
        deadline = None if math.isinf(timeout) else time.monotonic() + timeout
        try:
            self.process.stdin.write((json.dumps(request) + "\n").encode())
            self.process.stdin.flush()
        except OSError:
            pass  # it died already: its exit status says how, below
        stream = self.process.stdout.fileno()
        while b"\n" not in self.answers:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([stream], [], [], POLL_SECONDS if left is None else min(left, POLL_SECONDS))
            if not ready:
                if left is not None and left <= POLL_SECONDS:
                    self.stop()
                    return f"timed out after {timeout:g} s"
                if on_wait is not None:
                    on_wait()
                continue
            chunk = os.read(stream, 4096)
            if not chunk:
                return f"exited with status {self.stop()}"
            self.answers += chunk
        answer, _, self.answers = self.answers.partition(b"\n")
        if answer.decode().strip() != DONE:
            return f"answered {answer[:200]!r}"
        return None

    def stop(self) -> int:
        """Kill the worker and the processes it started (its own session); its exit status."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.process.kill()
        status = self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()
        return status

    def close(self) -> None:
        """End of requests: the worker exits; stopped if it does not within a few seconds."""
        try:
            if self.process.stdin is not None:
                self.process.stdin.close()
            self.process.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.stop()


@dataclass
class _Pool:
    """The crosscheck's worker threads: each takes the next pending target, sends it to its worker
    process (a new one when the target needs environment variables that worker was not started
    with, or the last one died) and turns what the worker left into a ``CheckReport``."""

    directory: str
    device: str
    max_examples: int
    seed: int | None
    properties: Sequence[str] | None
    timeout: float | None
    progress: Progress
    selected: list[tuple[Target, tuple[str, ...]]]
    pending: list[int]
    plot_dir: str | None = None
    results: dict[int, tuple[CheckReport, float]] = field(default_factory=dict)
    workers: set[_Worker] = field(default_factory=set)
    numbers: Iterator[int] = field(default_factory=itertools.count)
    stopped: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def say(self, line: str) -> None:
        self.progress.note(line)

    def serve(self) -> None:
        worker: _Worker | None = None
        try:
            while True:
                with self.lock:
                    if self.stopped or not self.pending:
                        return
                    index = self.pending.pop(0)
                target, dtypes = self.selected[index]
                if worker is not None and not _compatible(worker.environment, target.environment):
                    worker.close()
                    self._forget(worker)
                    worker = None
                self.say(f"checking {target.name} ({', '.join(dtypes)}) ...")
                start = time.perf_counter()
                try:
                    if worker is None:
                        worker = self._start(target.environment)
                    result, seconds, alive = self._check(worker, index, target, dtypes)
                except Exception as error:  # the crosscheck could not run its worker (an ERROR, never a FAIL)
                    result = _dead_worker_report(target, dtypes, self.properties, {},
                                                 f"could not run ({type(error).__name__}: {error})", "")
                    seconds, alive = time.perf_counter() - start, False
                if not alive and worker is not None:
                    worker.stop()
                    self._forget(worker)
                    worker = None
                self.results[index] = (result, seconds)
                self.say(f"{target.name}: {result.summary()} ({time.perf_counter() - start:.1f} s)")
        finally:
            if worker is not None:
                worker.close()
                self._forget(worker)

    def _start(self, environment: tuple[tuple[str, str], ...]) -> _Worker:
        with self.lock:
            if self.stopped:
                raise RuntimeError("the crosscheck was stopped")
            worker = _Worker(environment, os.path.join(self.directory, f"worker-{next(self.numbers)}.log"),
                             _shared_environment(self.directory, self.device))
            self.workers.add(worker)
        return worker

    def _forget(self, worker: _Worker) -> None:
        with self.lock:
            self.workers.discard(worker)

    def _check(self, worker: _Worker, index: int, target: Target,
               dtypes: tuple[str, ...]) -> tuple[CheckReport, float, bool]:
        """The target's report from ``worker``, its seconds, and whether the worker is still usable."""
        path = os.path.join(self.directory, f"{index}.results")
        request = {"name": target.name, "builder": target.builder, "device": self.device, "dtypes": list(dtypes),
                   "max_examples": self.max_examples, "seed": self.seed,
                   "properties": None if self.properties is None else list(self.properties), "results": path,
                   "plot_dir": self.plot_dir}
        log_start, start = worker.log_size(), time.perf_counter()
        limit = self.timeout
        if limit is None:
            limit = DEFAULT_TIMEOUT * len(dtypes) * max(1.0, self.max_examples / 10)
        reader = _RecordReader(path)

        def report_progress() -> None:  # the properties the worker finished since the last look
            for record in reader.new():
                if record[0] == "outcome" and record[1].status.counted:
                    self.progress.end(target.name, record[1], record[2])

        died = worker.ask(request, limit, on_wait=report_progress)
        report_progress()
        records = _read_records(path)
        done = [record for record in records if record[0] == "done"]
        outcomes = {record[1].name: record[1] for record in records if record[0] == "outcome"}
        if died is None and done:
            _, header, seconds = done[-1]
            return CheckReport(header, list(outcomes.values()), dtypes=dtypes), seconds, True
        if self.stopped:
            died = "was stopped (the crosscheck was interrupted)"
        result = _dead_worker_report(target, dtypes, self.properties, outcomes,
                                     died or "answered without its last record", _tail(worker.log_path, log_start))
        return result, time.perf_counter() - start, False

    def stop_all(self) -> None:
        """Stop every worker still running; no thread takes another target."""
        with self.lock:
            self.stopped = True
            workers = list(self.workers)
        for worker in workers:
            worker.stop()


def _compatible(worker: tuple[tuple[str, str], ...], target: tuple[tuple[str, str], ...]) -> bool:
    """Whether a worker started with ``worker``'s environment variables can run a target that needs
    ``target``'s: it has each of them, with the same value (a target that needs none runs anywhere)."""
    have = dict(worker)
    return all(have.get(name) == value for name, value in target)


def _shared_environment(directory: str, device: str) -> dict[str, str]:
    """What every worker of a run shares (the user's own settings win): jax's persistent compilation
    cache in the run's directory, every program cached, so that targets handing XLA the same program
    (flax nnx and keras on jax both call jax.nn) compile it once per run and load it after; on
    CUDA, jax allocating GPU memory as it goes, so that several jax workers fit on one GPU (by
    default each would take 75% of it at start)."""
    shared = {"JAX_COMPILATION_CACHE_DIR": os.path.join(directory, "jax-cache"),
              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    if device != "cpu":
        shared["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    return shared


class _RecordReader:
    """The records a worker appends to ``path``, read as they come: each call of ``new`` unpickles
    only what was written since the last (up to the first incomplete record)."""

    def __init__(self, path: str) -> None:
        self.path, self.offset = path, 0

    def new(self) -> list[tuple[Any, ...]]:
        records: list[tuple[Any, ...]] = []
        try:
            with open(self.path, "rb") as file:
                file.seek(self.offset)
                while True:
                    try:
                        records.append(pickle.load(file))
                    except (EOFError, pickle.UnpicklingError, AttributeError, ValueError):
                        return records
                    self.offset = file.tell()
        except FileNotFoundError:
            return records


def _read_records(path: str) -> list[tuple[Any, ...]]:
    """The worker's records, up to the first incomplete one (a worker killed while writing)."""
    records: list[tuple[Any, ...]] = []
    try:
        with open(path, "rb") as file:
            while True:
                records.append(pickle.load(file))
    except (FileNotFoundError, EOFError, pickle.UnpicklingError, AttributeError, ValueError):
        pass
    return records


def _tail(path: str, start: int = 0) -> str:
    """The last lines of the log from byte ``start`` (what the worker wrote for one target)."""
    try:
        with open(path, "rb") as file:
            file.seek(start)
            lines = file.read().decode("utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return ""
    return "\n".join(lines[-STDERR_TAIL_LINES:])


def _dead_worker_report(target: Target, dtypes: tuple[str, ...], properties: Sequence[str] | None,
                        outcomes: dict[str, PropertyOutcome], died: str, tail: str) -> CheckReport:
    """The outcomes a worker wrote before it died, the property it was on as ERROR with its stderr's
    end, and every other property it was to run as ERROR (not checked)."""
    stderr = "\n".join(["worker stderr ends:", *("  " + line for line in tail.splitlines())] if tail
                       else ["worker stderr: empty"])
    result = CheckReport(f"{target.name} (its worker {died})", dtypes=dtypes)
    dying: str | None = None
    for planned in target.plan(dtypes, properties):
        if planned.name in outcomes:
            result.outcomes.append(outcomes[planned.name])
        elif planned.status != Status.ERROR:  # not run or not applicable, as planned
            result.outcomes.append(planned)
        elif dying is None:
            dying = planned.name
            result.outcomes.append(PropertyOutcome(planned.name, planned.rules, Status.ERROR,
                                                   f"the crosscheck worker {died} while checking this property\n"
                                                   f"{stderr}"))
        else:
            result.outcomes.append(PropertyOutcome(planned.name, planned.rules, Status.ERROR,
                                                   f"not checked: the crosscheck worker {died} while checking "
                                                   f"{dying}"))
    return result
