"""rule 12: errors: every bad input of the catalogue (``attention_ref.testing.bad_inputs``) raises the
spec's error type with the front door's message (rule 6: a non-boolean mask is a TypeError; rule 10:
dtypes and compute dtypes)."""

from __future__ import annotations

from ..bad_inputs import check_bad_inputs
from ..implementation import Subject
from ..runner import attention_property


@attention_property("bad_inputs_raise_the_spec_errors", (6, 10, 12), requires=("spec_errors",))
def bad_inputs_raise_the_spec_errors(subject: Subject) -> None:
    """Every bad input of the catalogue raises the spec's error type with the same message as the front door."""
    check_bad_inputs(subject.impl, vjp="grad" in subject.features)
