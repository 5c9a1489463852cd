"""Crosscheck targets in a process of their own: ``python -m attention_ref.testing.crosscheck_worker``.

The worker reads requests from stdin, one JSON object a line, and runs one target per request: its
``name``, ``builder`` and ``device`` (to build it again, ``adapters.find_target``), the run's
``dtypes``, ``max_examples``, ``seed``, ``properties`` (null: all) and ``plot_dir`` (null: no
pictures), and ``results``, a file. It
runs the target's properties one at a time, in report order, and appends each outcome to
``results`` as soon as it has it (pickled records, flushed), so that a worker that dies keeps what
it finished:

* ``("outcome", PropertyOutcome, seconds)`` per property, then
* ``("done", header, seconds)``: the report's header line and the seconds of the whole check;

then answers ``done`` on its own stdout (what the libraries print goes to stderr instead). It exits
at the end of stdin.

The parent (``crosscheck``) starts it with the environment of the targets it sends it (keras reads
``KERAS_BACKEND`` once, at import, so targets of different environments never share a worker) and
turns a crash, a hang or a missing record into ERROR outcomes with the end of the worker's stderr.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import time
from typing import IO, Any

from .adapters import find_target
from .report import Status

#: The line a worker answers when a request is done.
DONE = "done"


def _write(results: IO[bytes], record: tuple[Any, ...]) -> None:
    pickle.dump(record, results)
    results.flush()


def run(request: dict[str, Any], results: IO[bytes]) -> None:
    """Run the requested target's properties, writing a record per property and a last one."""
    target = find_target(request["name"], request["device"], request["builder"])
    dtypes, properties = tuple(request["dtypes"]), request["properties"]
    header, total = target.name, 0.0
    for planned in target.plan(dtypes, properties):
        if planned.status != Status.ERROR:  # not run, or not applicable: nothing to run
            _write(results, ("outcome", planned, 0.0))
            continue
        start = time.perf_counter()
        report = target.run(dtypes=dtypes, max_examples=request["max_examples"], seed=request["seed"],
                            properties=(planned.name,), plot_dir=request.get("plot_dir"))
        seconds = time.perf_counter() - start
        total += seconds
        header = report.target
        outcome = next(o for o in report.outcomes if o.name == planned.name)
        _write(results, ("outcome", outcome, seconds))
    _write(results, ("done", header, total))


def main() -> int:
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # what libraries print goes to stderr
    for line in sys.stdin:
        request = json.loads(line)
        with open(request["results"], "ab") as results:
            run(request, results)
        print(DONE, file=answers, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
