"""Progress of ``check``, ``verify`` and ``crosscheck`` as they run: a bar on a terminal, lines, or
nothing.

A run tells its :class:`Progress` how many property runs it plans (``plan``), when one starts
(``start``: the target and the property), each Hypothesis example it runs (``example``), when one
ends (``end``: its outcome and seconds), and free ``note`` lines (a crosscheck target starting). The
base class ignores every event (the quiet progress). ``make_progress(mode)`` chooses:

* ``"auto"`` (the command line's default): a bar when the stream is a terminal and rich (the
  ``progress`` extra) is installed, a line per property on a terminal without rich, nothing when the
  stream is not a terminal (a CI log, a pipe);
* ``"bar"``: the bar (lines without rich); ``"lines"``: a line per property and note; ``"none"``.

Events may come from several threads (the crosscheck's); every implementation here takes a lock.
"""

from __future__ import annotations

import sys
import threading
from typing import IO, Any

from .report import PropertyOutcome

PROGRESS_MODES = ("auto", "bar", "lines", "none")


class Progress:
    """The quiet progress: every event is ignored. Subclasses show them."""

    def plan(self, total: int) -> None:
        """``total`` property runs are planned (more may be added by later calls)."""

    def start(self, target: str, name: str) -> None:
        """Property ``name`` starts on ``target``."""

    def example(self) -> None:
        """One more Hypothesis example of the running property was run."""

    def end(self, target: str, outcome: PropertyOutcome, seconds: float) -> None:
        """A property ended on ``target`` with ``outcome`` after ``seconds``."""

    def note(self, line: str) -> None:
        """A line about the run (not about one property)."""

    def close(self) -> None:
        """The run is over."""

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LineProgress(Progress):
    """A line per ended property (``target name: status (seconds)``) and per note, to ``stream``."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self._lock = threading.Lock()

    def _write(self, line: str) -> None:
        with self._lock:
            print(line, file=self.stream, flush=True)

    def end(self, target: str, outcome: PropertyOutcome, seconds: float) -> None:
        if outcome.status.counted:  # n/a and not run: nothing ran
            self._write(f"{target} {outcome.name}: {outcome.status} ({seconds:.1f} s)")

    def note(self, line: str) -> None:
        self._write(line)


class BarProgress(Progress):
    """A rich progress bar on ``stream``: the property runs done of those planned, and a description
    with the target, the property and the examples run so far; FAIL and ERROR outcomes are printed
    above the bar as they happen."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        self._console = Console(file=stream if stream is not None else sys.stderr)
        self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=self._console, transient=True)
        self._task = self._bar.add_task("starting", total=0)
        self._lock = threading.Lock()
        self._running: dict[str, tuple[str, int]] = {}  # target -> (property, examples)
        self._last = ""
        self._bar.start()

    def _describe(self) -> None:
        parts = [f"{target} · {name} · {examples} examples" for target, (name, examples) in self._running.items()]
        self._bar.update(self._task, description="; ".join(parts) or self._last)

    def plan(self, total: int) -> None:
        with self._lock:
            task = self._bar.tasks[0]
            self._bar.update(self._task, total=(task.total or 0) + total)

    def start(self, target: str, name: str) -> None:
        with self._lock:
            self._running[target] = (name, 0)
            self._describe()

    def example(self) -> None:
        with self._lock:
            if len(self._running) == 1:  # examples are counted in the process that runs them
                target, (name, examples) = next(iter(self._running.items()))
                self._running[target] = (name, examples + 1)
                self._describe()

    def end(self, target: str, outcome: PropertyOutcome, seconds: float) -> None:
        with self._lock:
            self._running.pop(target, None)
            self._last = f"{target} · {outcome.name}: {outcome.status}"
            if not outcome.status.ok:
                self._console.print(f"{outcome.status} {outcome.name} on {target} ({seconds:.1f} s)")
            self._bar.advance(self._task)
            self._describe()

    def note(self, line: str) -> None:
        with self._lock:
            self._last = line
            self._describe()

    def close(self) -> None:
        self._bar.stop()


def _rich_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("rich") is not None


def make_progress(mode: str = "auto", stream: IO[str] | None = None) -> Progress:
    """The progress for ``mode`` (``PROGRESS_MODES``, see the module docstring) on ``stream``
    (default standard error); ValueError for another mode."""
    if mode not in PROGRESS_MODES:
        raise ValueError(f"progress must be one of {', '.join(PROGRESS_MODES)}, got {mode!r}")
    stream = stream if stream is not None else sys.stderr
    if mode == "auto":
        terminal = bool(getattr(stream, "isatty", lambda: False)())
        mode = ("bar" if _rich_installed() else "lines") if terminal else "none"
    if mode == "bar":
        return BarProgress(stream) if _rich_installed() else LineProgress(stream)
    if mode == "lines":
        return LineProgress(stream)
    return Progress()


def as_progress(progress: Progress | Any | None) -> Progress:
    """``progress`` as a ``Progress``: None is the quiet one; a callable taking a line (the older
    interface of ``verify`` and ``crosscheck``) gets what ``LineProgress`` would print."""
    if progress is None:
        return Progress()
    if isinstance(progress, Progress):
        return progress
    return _CallableProgress(progress)


class _CallableProgress(LineProgress):
    def __init__(self, write: Any) -> None:
        super().__init__()
        self._write_line = write

    def _write(self, line: str) -> None:
        with self._lock:
            self._write_line(line)
