"""``attention-ref crosscheck``: every installed framework kernel against SPEC.md, as one matrix.

Each built-in target of ``attention_ref.testing.adapters`` is run through ``check`` with its
declared features and conventions. The matrix has one row per property and one column per target;
a cell is ``pass``, ``FAIL``, ``ERROR`` (the property could not run), ``differs [n,...]`` (passed
given the declared conventions [n,...], which were exercised and verified) or ``n/a`` (the target
lacks a feature the property needs). Under the matrix: each target's declared conventions, the
evidence for every "differs" and the shrunk failing case of every FAIL and ERROR.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .adapters import Target, available_targets
from .check import CheckReport, check
from .report import Status, render_table, summary_line
from .runner import PROPERTIES, check_property_names

#: The dtypes checked by default: float32 on the CPU (about 3 minutes on 2 cores), half precision too on CUDA.
DEFAULT_DTYPES = {"cpu": ("float32",), "cuda": ("float16", "bfloat16", "float32")}

#: A matrix cell per status ("convention differs" becomes "differs [n,...]" with its footnotes).
_CELLS = {Status.PASS: "pass", Status.FAIL: "FAIL", Status.ERROR: "ERROR", Status.NOT_APPLICABLE: "n/a",
          Status.NOT_RUN: "-"}


@dataclass
class CrosscheckReport:
    """Per target, its ``CheckReport`` and the seconds it took."""

    device: str
    results: list[tuple[Target, CheckReport, float]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """No target failed or errored on any property."""
        return all(report.passed for _, report, _ in self.results)

    def summary(self) -> str:
        return summary_line(o.status for _, report, _ in self.results for o in report.outcomes)

    def render(self) -> str:
        if not self.results:
            return f"crosscheck on {self.device}: no framework kernel is installed (pip install torch, jax or flax)"
        footnotes: list[str] = []
        columns: list[dict[str, str]] = []
        for _, report, _ in self.results:
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
        names = [target.name for target, _, _ in self.results]
        rows = [(prop.name, *(cells.get(prop.name, "n/a") for cells in columns)) for prop in PROPERTIES]
        lines = [f"crosscheck on {self.device}: {len(names)} framework kernels against SPEC.md", "",
                 *render_table(("property", *names), rows, min_width=12)]
        lines += ["", "Declared conventions (exercised by the property):"]
        lines += [f"  [{i}] {text}" for i, text in enumerate(footnotes, 1)]
        for target, report, seconds in self.results:
            lines += ["", f"{target.name} ({target.framework}, {target.layout}, dtypes {', '.join(report.dtypes)}; "
                          f"{report.summary()}, {seconds:.1f} s)",
                      f"  supports: {', '.join(target.supports)}"]
            lines += [f"  note: {note}" for note in target.notes]
            for outcome in report.outcomes:
                if not outcome.status.ok:
                    detail = "\n".join("    " + line for line in outcome.detail.splitlines())
                    lines += [f"  {outcome.status} {outcome.name}:", detail]
        return "\n".join([*lines, "", self.summary()])

    __str__ = render


def crosscheck(
    *,
    device: str = "cpu",
    dtypes: Sequence[str] | None = None,
    max_examples: int = 10,
    seed: int | None = 0,
    only: Sequence[str] = (),
    properties: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> CrosscheckReport:
    """Check every built-in target available on ``device`` ("cpu" or "cuda"), in each of ``dtypes``
    it supports (default: all it supports), ``max_examples`` per property. ``only`` keeps the
    targets whose name contains one of its strings; ``properties`` names the properties to run
    (default: all; the others are "not run"); ``progress`` receives a line per target."""
    check_property_names(properties)
    report = CrosscheckReport(device)
    for target in available_targets(device):
        if only and not any(part in target.name for part in only):
            continue
        chosen = tuple(d for d in target.dtypes if dtypes is None or d in dtypes)
        if not chosen:
            continue
        if progress is not None:
            progress(f"checking {target.name} ({', '.join(chosen)}) ...")
        start = time.perf_counter()
        result = check(target.kernel, framework=target.framework, supports=target.supports, layout=target.layout,
                       dtypes=chosen, fully_masked=target.fully_masked, max_examples=max_examples, seed=seed,
                       name=target.name, device=target.device, few_shapes=target.few_shapes, properties=properties)
        report.results.append((target, result, time.perf_counter() - start))
    return report
