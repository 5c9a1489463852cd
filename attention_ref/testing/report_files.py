"""Machine-readable reports of ``check``, ``verify`` and ``crosscheck``: JSON and JUnit XML, both
derived from one document.

Every report gives its ``suites()``: one :class:`Suite` per target (a kernel, a backend, a crosscheck
target), each with its ``PropertyOutcome`` list. ``report_document`` turns them and the run's
settings into the JSON document of ``report_schema.json`` (``SCHEMA_VERSION``); ``write_json``
writes it and ``write_junit`` writes JUnit XML made from the same document, so that the two always
agree:

* a suite is a ``<testsuite>``, a property a ``<testcase classname="attention_ref.<command>.<suite>"
  name="<property>">``;
* FAIL is a ``<failure>``, ERROR an ``<error>`` (the checker could not run the property: never a
  failure of the kernel), n/a and not run are ``<skipped>``; "convention differs" passes, with its
  evidence in ``<system-out>``;
* the message is the detail's first line and the text the whole detail; characters XML 1.0 forbids
  (a worker's stderr may hold control characters) are written as ``\\xNN`` escapes.

JSON has no infinities or NaN: a non-finite number (a bias of -inf, an lse of -inf, a NaN output)
is written as the string ``"inf"``, ``"-inf"`` or ``"nan"``.
"""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .report import PropertyOutcome, Status

#: The version of ``report_schema.json``; a change that breaks a reader of the old documents
#: increments it.
SCHEMA_VERSION = 1
#: The ``schema`` field of every document.
SCHEMA_NAME = "attention_ref.report"

#: The JSON name of each status (stable identifiers, independent of what tables print).
STATUS_NAMES = {Status.PASS: "pass", Status.FAIL: "fail", Status.ERROR: "error",
                Status.CONVENTION_DIFFERS: "convention_differs", Status.NOT_APPLICABLE: "not_applicable",
                Status.NOT_RUN: "not_run"}


@dataclass(frozen=True)
class Suite:
    """One target's outcomes: ``name`` (the kernel, backend or crosscheck target), ``description``
    (the report's header for it: declared features, dtypes...), its ``outcomes`` in report order and
    the ``seconds`` it took."""

    name: str
    outcomes: Sequence[PropertyOutcome]
    description: str = ""
    seconds: float = 0.0


def schema() -> dict[str, Any]:
    """The published JSON schema of the documents (``attention_ref/testing/report_schema.json``)."""
    text = resources.files("attention_ref.testing").joinpath("report_schema.json").read_text(encoding="utf-8")
    schema_document: dict[str, Any] = json.loads(text)
    return schema_document


def _plain(value: Any) -> Any:
    """``value`` with every non-finite float as a string and tuples as lists (JSON-ready)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if hasattr(value, "item") and callable(value.item):  # a NumPy scalar
        return _plain(value.item())
    return value


def _outcome(outcome: PropertyOutcome) -> dict[str, Any]:
    return {"name": outcome.name, "rules": list(outcome.rules), "status": STATUS_NAMES[outcome.status],
            "detail": outcome.detail, "case": outcome.case, "worst": outcome.worst, "picture": outcome.picture,
            "seconds": round(outcome.seconds, 3)}


def _counts(outcomes: Iterable[PropertyOutcome]) -> dict[str, int]:
    counts = dict.fromkeys(STATUS_NAMES.values(), 0)
    for outcome in outcomes:
        counts[STATUS_NAMES[outcome.status]] += 1
    return counts


def report_document(command: str, suites: Sequence[Suite], *, seed: int | None, max_examples: int | None,
                    seconds: float, device: str | None = None, dtypes: Sequence[str] = (),
                    summary: str = "") -> dict[str, Any]:
    """The JSON document (``report_schema.json``) of a ``command`` ("check", "verify", "crosscheck")
    run: its settings, a pass/fail verdict, the counts per status and every suite's outcomes."""
    from .. import __version__

    every = [outcome for suite in suites for outcome in suite.outcomes]
    document = {
        "schema": SCHEMA_NAME,
        "version": SCHEMA_VERSION,
        "command": command,
        "attention_ref_version": __version__,
        "seed": seed,
        "max_examples": max_examples,
        "device": device,
        "dtypes": list(dtypes),
        "seconds": round(seconds, 3),
        "passed": all(outcome.status.ok for outcome in every),
        "summary": summary,
        "counts": _counts(every),
        "suites": [{"name": suite.name, "description": suite.description, "seconds": round(suite.seconds, 3),
                    "counts": _counts(suite.outcomes), "properties": [_outcome(o) for o in suite.outcomes]}
                   for suite in suites],
    }
    plain: dict[str, Any] = _plain(document)
    return plain


def write_json(path: str | Path, document: dict[str, Any]) -> Path:
    """Write ``document`` (``report_document``) as indented JSON; the path written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


#: The characters XML 1.0 forbids (control characters other than tab, newline and carriage return,
#: surrogates, U+FFFE and U+FFFF): a worker's stderr or a kernel's message may hold them.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml(text: str) -> str:
    """``text`` with every character XML 1.0 forbids written as ``\\xNN`` (``\\uNNNN``)."""
    return _NOT_XML.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def junit_tree(document: dict[str, Any]) -> ElementTree.ElementTree:
    """The JUnit XML of ``document`` (the module docstring says how each status maps)."""
    root = ElementTree.Element("testsuites", name=f"attention-ref {document['command']}")
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in document["suites"]:
        counts = suite["counts"]
        numbers = {"tests": len(suite["properties"]), "failures": counts["fail"], "errors": counts["error"],
                   "skipped": counts["not_applicable"] + counts["not_run"]}
        for key, value in numbers.items():
            totals[key] += value
        attributes = {"name": _xml(suite["name"]), "time": f"{suite['seconds']:.3f}"}
        element = ElementTree.SubElement(root, "testsuite",
                                         attrib={**attributes, **{key: str(n) for key, n in numbers.items()}})
        if suite["description"]:
            properties = ElementTree.SubElement(element, "properties")
            ElementTree.SubElement(properties, "property", name="description", value=_xml(suite["description"]))
        classname = _xml(f"attention_ref.{document['command']}.{suite['name']}")
        for outcome in suite["properties"]:
            case = ElementTree.SubElement(element, "testcase", classname=classname, name=outcome["name"],
                                          time=f"{outcome['seconds']:.3f}")
            status, detail = outcome["status"], outcome["detail"]
            message = _xml(detail.splitlines()[0] if detail else status)
            if status in ("fail", "error"):
                kind = "failure" if status == "fail" else "error"
                text = detail + (f"\npicture: {outcome['picture']}" if outcome["picture"] else "")
                ElementTree.SubElement(case, kind, message=message, type=status.upper()).text = _xml(text)
            elif status in ("not_applicable", "not_run"):
                reason = "n/a: a feature it needs is not declared" if status == "not_applicable" else "not run"
                ElementTree.SubElement(case, "skipped", message=reason)
            elif status == "convention_differs":
                ElementTree.SubElement(case, "system-out").text = _xml("convention differs:\n" + detail)
    for key, value in totals.items():
        root.set(key, str(value))
    root.set("time", f"{document['seconds']:.3f}")
    return ElementTree.ElementTree(root)


def write_junit(path: str | Path, document: dict[str, Any]) -> Path:
    """Write the JUnit XML of ``document`` (``junit_tree``); the path written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tree = junit_tree(document)
    ElementTree.indent(tree)
    tree.write(path, encoding="utf-8", xml_declaration=True)
    return path


def write_reports(document: dict[str, Any], *, json_path: str | Path | None = None,
                  junit_path: str | Path | None = None) -> None:
    """Write the JSON and/or JUnit files asked for (None: not that one)."""
    if json_path is not None:
        write_json(json_path, document)
    if junit_path is not None:
        write_junit(junit_path, document)
