"""Assertions of the tolerance rules: results and gradients against the float64 oracle, or against
each other, within the bounds of ``attention_ref.tolerance`` and exactly where SPEC.md fixes a value.

The public rules are ``assert_attention_close`` (rule 10) and ``assert_gradients_close`` (rule 14);
the properties build on ``assert_within`` (one array against another, elementwise), ``assert_matches``
(out, weights and lse), ``assert_same_results`` and ``assert_same_gradients`` (two results the spec
says are equal) and ``assert_finite``. ``bounds_for`` and ``gradient_bounds_for`` give the tolerance
a :class:`~attention_ref.testing.implementation.Subject` is held to: the derived bound for
implementations of SPEC.md, the calibrated rule for other people's kernels.

PYTEST_DONT_REWRITE: pytest rewrites the asserts of a plugin's distribution (the ``pytest11``
entry point makes this package one); this module's assertion messages are reported as written.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..result import AttentionOutput, Gradients
from ..tolerance import ErrorBounds, GradientBounds
from .cases import AttentionCase, full_results
from .implementation import Subject

#: The fields of ``Gradients``, in order.
GRADIENT_NAMES = ("dq", "dk", "dv", "dbias")


class ElementMismatch(AssertionError):
    """``assert_within``'s failure, with what it compared kept for reports and pictures.

    ``what`` names the compared array (``"out"``, ``"weights"``, ``"dq"``, or a property's own label
    such as ``"causal rows: out"``); ``actual``, ``expected`` and ``bound`` are float64 arrays of the
    compared shape; ``exact`` (bool, same shape) marks the elements that must be equal; ``worst`` is
    the index of the worst element (an exact element that differs ranks first, then the largest
    error over its bound) and ``wrong`` the number of elements outside their bound; ``case`` is the
    case whose results were compared.
    """

    def __init__(self, message: str, *, what: str, case: AttentionCase, actual: np.ndarray, expected: np.ndarray,
                 bound: np.ndarray, exact: np.ndarray, worst: tuple[int, ...], wrong: int) -> None:
        super().__init__(message)
        self.what, self.case = what, case
        self.actual, self.expected, self.bound, self.exact = actual, expected, bound, exact
        self.worst, self.wrong = worst, wrong

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (the crosscheck's workers send outcomes)
        return (_rebuild_mismatch, (str(self), self.what, self.case, self.actual, self.expected, self.bound,
                                    self.exact, self.worst, self.wrong))

    def worst_element(self) -> dict[str, Any]:
        """The worst element as plain values: ``array`` (``what``), ``index``, ``got``, ``expected``,
        ``error`` (``|got - expected|``), ``bound`` (None where the spec fixes the value: ``exact``),
        ``wrong`` and ``size`` (elements outside their bound, of all compared)."""
        i = self.worst
        error = abs(float(self.actual[i]) - float(self.expected[i])) if self.actual[i] != self.expected[i] else 0.0
        return {"array": self.what, "index": [int(j) for j in i], "got": float(self.actual[i]),
                "expected": float(self.expected[i]), "error": error,
                "bound": None if self.exact[i] else float(self.bound[i]), "wrong": self.wrong,
                "size": int(self.expected.size)}


def _rebuild_mismatch(message: str, *args: Any) -> ElementMismatch:
    what, case, actual, expected, bound, exact, worst, wrong = args
    return ElementMismatch(message, what=what, case=case, actual=actual, expected=expected, bound=bound, exact=exact,
                           worst=worst, wrong=wrong)


# ---- bounds --------------------------------------------------------------------------------------


def bounds_for(subject: Subject, case: AttentionCase, **kwargs: Any) -> ErrorBounds:
    """The tolerance ``subject`` is held to on ``case``: ``case.bounds(**kwargs)``, calibrated when
    ``subject.calibrated``."""
    return case.bounds(calibrated=subject.calibrated, **kwargs)


def gradient_bounds_for(subject: Subject, case: AttentionCase, d_out: np.ndarray, expected: Gradients | None = None,
                        **kwargs: Any) -> GradientBounds:
    """The gradient tolerance ``subject`` is held to for the cotangent ``d_out`` (calibrated when
    ``subject.calibrated``); ``expected`` defaults to the oracle's gradients."""
    expected = case.oracle_gradients(d_out) if expected is None else expected
    return case.gradient_bounds(d_out, expected, calibrated=subject.calibrated, **kwargs)


# ---- elementwise -----------------------------------------------------------------------------------


def assert_within(
    what: str,
    actual: np.ndarray,
    expected: np.ndarray,
    bound: np.ndarray | float,
    case: AttentionCase,
    *,
    exact: np.ndarray | None = None,
    derivation: str = "",
) -> None:
    """``|actual - expected| <= bound`` elementwise; equality where ``exact`` (and wherever
    ``expected`` is infinite); NaN never passes. The message shows the worst element, its error and
    bound, and ``derivation`` (how the bound was obtained)."""
    __tracebackhide__ = True
    actual = np.asarray(actual)
    assert actual.shape == expected.shape, (
        f"{what}: shape {actual.shape}, expected {expected.shape}\n  case: {case!r}"
    )
    a64, e64 = actual.astype(np.float64), np.asarray(expected, dtype=np.float64)
    bound = np.broadcast_to(np.asarray(bound, dtype=np.float64), e64.shape)
    with np.errstate(invalid="ignore"):
        error = np.where(a64 == e64, 0.0, np.abs(a64 - e64))
    must_equal = ~np.isfinite(e64)
    if exact is not None:
        must_equal = must_equal | np.broadcast_to(exact, e64.shape)
    bad = np.isnan(error) | np.where(must_equal, error != 0, error > bound)
    if not bad.any():
        return
    with np.errstate(over="ignore", invalid="ignore"):  # huge errors over tiny bounds: inf ranks first
        ratio = np.where(bad, np.nan_to_num(error / np.where(bound > 0, bound, np.inf), nan=np.inf, posinf=np.inf), -1)
    worst = tuple(int(i) for i in np.unravel_index(np.argmax(np.where(must_equal & bad, np.inf, ratio)), e64.shape))
    rule = "exactly" if must_equal[worst] else f"within {bound[worst]:.3g}"
    raise ElementMismatch(
        f"{what}: {int(bad.sum())} of {bad.size} elements wrong; worst at {worst}: "
        f"got {a64[worst]!r}, expected {e64[worst]!r} {rule} (|error| {error[worst]:.3g})\n"
        + (f"  bound: {derivation}\n" if derivation and not must_equal[worst] else "")
        + f"  case: {case!r}",
        what=what, case=case, actual=a64, expected=e64, bound=np.array(bound), exact=np.array(must_equal),
        worst=worst, wrong=int(bad.sum()),
    )


def assert_finite(what: str, result: AttentionOutput, case: AttentionCase) -> None:
    """No NaN or infinity in out and weights, no NaN or +inf in lse (-inf is a fully excluded row's)."""
    __tracebackhide__ = True
    for name, x in zip(("out", "weights", "lse"), result, strict=True):
        if x is None:
            continue
        x64 = np.asarray(x, dtype=np.float64)
        nan_or_inf = np.isnan(x64) | (np.isinf(x64) if name != "lse" else np.isposinf(x64))
        assert not nan_or_inf.any(), (
            f"{what}: {name} has {int(nan_or_inf.sum())} NaN/inf values at "
            f"{[tuple(int(i) for i in ix) for ix in np.argwhere(nan_or_inf)[:3]]}\n  case: {case!r}"
        )


# ---- results ---------------------------------------------------------------------------------------


def assert_matches(result: AttentionOutput, expected: AttentionOutput, bounds: ErrorBounds,
                   case: AttentionCase) -> None:
    """out, weights and lse within ``bounds`` of ``expected``; exact where rule 8 fixes the value
    (excluded keys, fully excluded rows)."""
    __tracebackhide__ = True
    allowed = case.allowed()
    fully_excluded = ~np.asarray(allowed.any(axis=-1))
    how = bounds.derivation
    assert_within("out", result.out, expected.out, bounds.out, case, exact=fully_excluded[..., None], derivation=how)
    if result.weights is not None:
        assert_within("weights", result.weights, expected.weights, bounds.weights, case, exact=~allowed,
                      derivation=how)
    if result.lse is not None:
        assert_within("lse", result.lse, expected.lse, bounds.lse, case, exact=fully_excluded, derivation=how)


def assert_attention_close(actual: AttentionOutput | np.ndarray, case: AttentionCase, *,
                           calibrated: bool = True, key_block: int | None = None) -> None:
    """The tolerance rule: ``actual`` (an ``AttentionOutput`` of NumPy arrays, or the bare out array)
    matches the float64 oracle of ``case``.

    Elementwise within the bound of ``attention_ref.tolerance``: the calibrated rule for other
    people's kernels (default) or, with ``calibrated=False``, the derived bound SPEC.md holds its own
    backends to; exactly where SPEC.md fixes the value (excluded keys: weight 0; fully excluded rows:
    out 0, weights 0, lse -inf). NaN never passes. Raises AssertionError showing the worst element,
    its error, the bound and its derivation, and the case. ``key_block``: the blocked algorithm's
    ``block_k`` that computed ``actual`` (rule 19; None: dense, or one key block).
    """
    __tracebackhide__ = True
    if not isinstance(actual, AttentionOutput):
        actual = AttentionOutput(np.asarray(actual))
    oracle = case.oracle()
    assert_matches(actual, oracle, case.bounds(oracle=oracle, calibrated=calibrated, key_block=key_block), case)


def assert_matches_oracle(subject: Subject, case: AttentionCase, result: AttentionOutput | None = None) -> None:
    """The results of ``subject`` on ``case`` (or ``result``) match the float64 oracle within its tolerance."""
    __tracebackhide__ = True
    result = full_results(subject.impl, case) if result is None else result
    assert_attention_close(result, case, calibrated=subject.calibrated)


def assert_same_results(
    first: AttentionOutput, second: AttentionOutput, bound: ErrorBounds | None, case: AttentionCase, what: str
) -> None:
    """Two results that the spec says are equal, within ``bound`` or exactly (``bound=None``)."""
    __tracebackhide__ = True
    for name in ("out", "weights", "lse"):
        a, b = getattr(first, name), getattr(second, name)
        if a is None or b is None:
            continue
        assert_within(f"{what}: {name}", a, b, 0.0 if bound is None else getattr(bound, name), case,
                      exact=None if bound is not None else np.ones(b.shape, bool),
                      derivation="" if bound is None else bound.derivation)


# ---- gradients -------------------------------------------------------------------------------------


def assert_gradients_close(actual: Gradients, case: AttentionCase, d_out: np.ndarray, *, calibrated: bool = True,
                           expected: Gradients | None = None, with_dbias: bool = True,
                           key_block: int | None = None) -> None:
    """The gradient tolerance rule: ``actual`` (NumPy ``Gradients``) matches the float64 oracle's gradients
    for the cotangent ``d_out`` within ``attention_ref.tolerance.gradients`` (calibrated for other
    people's kernels, the default), exactly 0 where SPEC.md fixes them, never NaN. dbias is compared
    when the case has a bias and ``with_dbias``; ``key_block`` as for ``assert_attention_close``."""
    __tracebackhide__ = True
    expected = case.oracle_gradients(d_out) if expected is None else expected
    if not with_dbias:
        expected = expected._replace(dbias=None)
    bounds = case.gradient_bounds(d_out, expected, calibrated=calibrated, key_block=key_block)
    zeros = case.structural_zero_gradients()
    for name in GRADIENT_NAMES:
        want = getattr(expected, name)
        if want is None:
            continue
        got = getattr(actual, name)
        assert got is not None, f"{name} missing (the case has a bias)\n  case: {case!r}"
        assert_within(name, got, want, getattr(bounds, name), case, exact=getattr(zeros, name),
                      derivation=bounds.derivation)


def assert_same_gradients(first: Gradients, second: Gradients, bound: GradientBounds, case: AttentionCase,
                          what: str) -> None:
    """Two sets of gradients that the spec says are equal, within ``bound``."""
    __tracebackhide__ = True
    for name in GRADIENT_NAMES:
        a, b = getattr(first, name), getattr(second, name)
        if a is not None and b is not None:
            assert_within(f"{what}: {name}", a, b, getattr(bound, name), case, derivation=bound.derivation)
