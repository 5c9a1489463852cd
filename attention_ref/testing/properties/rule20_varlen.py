"""rule 20: packed variable-length attention: ``varlen_attention`` equals each segment's own attention
(the float64 oracle of the segment as an ordinary case) and the dense call on the packed sequence with
``varlen_mask``; tokens in no segment get out 0 and lse -inf; changing one segment changes nothing in
the others; the gradients are each segment's, exactly 0 for tokens in no segment and keys not used.

Cases are ``attention_ref.testing.varlen_strategies.varlen_cases``; the implementation needs
``varlen_attention`` and ``varlen_attention_vjp`` (the spec feature ``varlen``).

PYTEST_DONT_REWRITE: pytest rewrites the asserts of a plugin's distribution (the ``pytest11``
entry point makes this package one); this module's assertion messages are reported as written.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st

from ...result import AttentionOutput, Gradients
from ..assertions import assert_attention_close, assert_gradients_close, assert_same_results, assert_within, bounds_for
from ..cases import call
from ..implementation import Subject
from ..runner import attention_property
from ..strategies import Features
from ..varlen_strategies import VarlenCase, varlen_cases
from ._common import SEEDS


def call_varlen(subject: Subject, case: VarlenCase) -> AttentionOutput:
    """``subject.impl.varlen_attention`` on the case with ``return_lse``, as NumPy: out
    ``(total_q, Hq, Ev)``, lse ``(Hq, total_q)``."""
    impl: Any = subject.impl
    result = impl.varlen_attention(impl.asarray(case.q), impl.asarray(case.k), impl.asarray(case.v),
                                   case.cu_seqlens_q, case.cu_seqlens_k, **case.keywords(), return_lse=True)
    return AttentionOutput(impl.to_numpy(result.out), None, impl.to_numpy(result.lse))


def _segment_result(result: AttentionOutput, rows: slice) -> AttentionOutput:
    """The rows of one segment, heads first (an ``AttentionCase``'s layout)."""
    assert result.lse is not None
    return AttentionOutput(result.out[rows].swapaxes(0, 1), None, result.lse[:, rows])


def _noted(error: AssertionError, case: VarlenCase, b: int | None) -> AssertionError:
    """``error`` with a note naming the packed case (and segment b, when one segment's comparison failed)."""
    where = "" if b is None else f"segment {b} of "
    error.add_note(f"{where}the packed case: {case!r}")
    return error


def _check_shapes(result: AttentionOutput, case: VarlenCase) -> None:
    total_q, heads = case.q.shape[:2]
    assert result.lse is not None
    assert result.out.shape == (total_q, heads, case.v.shape[-1]) and result.lse.shape == (heads, total_q), (
        f"out {result.out.shape} and lse {result.lse.shape}, expected ({total_q}, {heads}, {case.v.shape[-1]}) and "
        f"({heads}, {total_q})\n  case: {case!r}")
    assert result.out.dtype == case.q.dtype, f"out is {result.out.dtype}, expected {case.q.dtype}\n  case: {case!r}"


def _check_outside(result: AttentionOutput, case: VarlenCase) -> None:
    """Tokens in no segment: out exactly 0, lse exactly -inf (rule 8)."""
    rows = case.outside_queries()
    assert result.lse is not None
    out, lse = result.out[rows], result.lse[:, rows]
    packed = case.packed()
    try:
        assert_within("out of tokens in no segment", out, np.zeros(out.shape), 0.0, packed,
                      exact=np.ones(out.shape, bool))
        assert_within("lse of tokens in no segment", lse, np.full(lse.shape, -np.inf), 0.0, packed)
    except AssertionError as error:
        raise _noted(error, case, None) from None


def _strategy(features: Features) -> st.SearchStrategy[VarlenCase]:
    return varlen_cases(features)


def _with_seeds(features: Features) -> st.SearchStrategy[tuple[VarlenCase, int]]:
    return st.tuples(varlen_cases(features), SEEDS)


@attention_property("varlen_equals_each_segments_attention", (20,), strategy=_strategy, requires=("varlen", "lse"))
def varlen_equals_each_segments_attention(subject: Subject, case: VarlenCase) -> None:
    """varlen_attention's out and lse equal each segment's own attention (its float64 oracle, within
    the tolerance rule), out 0 and lse -inf for tokens in no segment."""
    result = call_varlen(subject, case)
    _check_shapes(result, case)
    for b in range(case.num_segments):
        rows = case.query_rows(b)
        if rows.stop == rows.start:
            continue
        try:
            assert_attention_close(_segment_result(result, rows), case.segment(b), calibrated=subject.calibrated)
        except AssertionError as error:
            raise _noted(error, case, b) from None
    _check_outside(result, case)


@attention_property("varlen_equals_dense_with_varlen_mask", (20,), strategy=_strategy,
                    requires=("varlen", "lse", "mask"))
def varlen_equals_dense_with_varlen_mask(subject: Subject, case: VarlenCase) -> None:
    """varlen_attention equals attention on the packed sequence (heads first) with the explicit
    ``varlen_mask``, within twice the tolerance (two results of one implementation)."""
    result = call_varlen(subject, case)
    _check_shapes(result, case)
    packed = case.packed()
    dense = call(subject.impl, packed, return_lse=True)
    heads_first = AttentionOutput(result.out.swapaxes(0, 1), None, result.lse)
    try:
        assert_same_results(heads_first, dense, 2 * bounds_for(subject, packed), packed,
                            "varlen_attention against attention with varlen_mask")
    except AssertionError as error:
        raise _noted(error, case, None) from None


@attention_property("segments_are_independent", (20,), strategy=_with_seeds, requires=("varlen", "lse"))
def segments_are_independent(subject: Subject, example: tuple[VarlenCase, int]) -> None:
    """Redrawing one segment's q, k and v (or the tokens in no segment) changes nothing, bit for bit,
    in the other segments' out and lse."""
    case, seed = example
    rng = np.random.default_rng(seed)
    changed = int(rng.integers(case.num_segments + 1))  # B: the tokens in no segment
    other = case.replace_segment(changed, rng)
    before, after = call_varlen(subject, case), call_varlen(subject, other)
    assert before.lse is not None and after.lse is not None
    keep = np.ones(case.q.shape[0], dtype=bool)
    keep[case.query_rows(changed) if changed < case.num_segments else case.outside_queries()] = False
    packed = case.packed()
    what = f"after redrawing {'the tokens in no segment' if changed == case.num_segments else f'segment {changed}'}"
    try:
        assert_within(f"out of the other segments {what}", after.out[keep], before.out[keep], 0.0, packed,
                      exact=np.ones(before.out[keep].shape, bool))
        assert_within(f"lse of the other segments {what}", after.lse[:, keep], before.lse[:, keep], 0.0, packed,
                      exact=np.ones(before.lse[:, keep].shape, bool))
    except AssertionError as error:
        raise _noted(error, case, None) from None


@attention_property("varlen_gradients_match_each_segment", (14, 20), strategy=_with_seeds,
                    requires=("varlen", "grad"))
def varlen_gradients_match_each_segment(subject: Subject, example: tuple[VarlenCase, int]) -> None:
    """varlen_attention_vjp's dq, dk, dv equal each segment's own gradients (the float64 oracle's,
    within the gradient tolerance), exactly 0 for tokens in no segment and keys no query uses."""
    case, seed = example
    impl: Any = subject.impl
    d_out = np.asarray(np.random.default_rng(seed).standard_normal(
        (case.q.shape[0], case.q.shape[1], case.v.shape[-1]))).astype(case.q.dtype)
    grads = impl.varlen_attention_vjp(impl.asarray(case.q), impl.asarray(case.k), impl.asarray(case.v),
                                      case.cu_seqlens_q, case.cu_seqlens_k, impl.asarray(d_out), **case.keywords())
    dq, dk, dv = (impl.to_numpy(x) for x in grads[:3])
    packed = case.packed()
    for name, got, like in (("dq", dq, case.q), ("dk", dk, case.k), ("dv", dv, case.v)):
        assert got.shape == like.shape and got.dtype == like.dtype, (
            f"{name}: {got.dtype} {got.shape}, expected {like.dtype} {like.shape}\n  case: {case!r}")
    for b in range(case.num_segments):
        rows, keys = case.query_rows(b), case.key_rows(b)
        if rows.stop == rows.start or keys.stop == keys.start:  # no query attends, no key is attended
            zero_q, zero_k, zero_v = dq[rows], dk[keys], dv[keys]
            try:
                for what, x in (("dq", zero_q), ("dk", zero_k), ("dv", zero_v)):
                    assert_within(f"{what} of segment {b} (nothing attended)", x, np.zeros(x.shape), 0.0, packed,
                                  exact=np.ones(x.shape, bool))
            except AssertionError as error:
                raise _noted(error, case, b) from None
            continue
        segment = Gradients(dq[rows].swapaxes(0, 1), dk[keys].swapaxes(0, 1), dv[keys].swapaxes(0, 1), None)
        try:
            assert_gradients_close(segment, case.segment(b), d_out[rows].swapaxes(0, 1), calibrated=subject.calibrated)
        except AssertionError as error:
            raise _noted(error, case, b) from None
    unused = case.unused_keys()
    try:
        for what, x in (("dq", dq[case.outside_queries()]), ("dk", dk[unused]), ("dv", dv[unused])):
            assert_within(f"{what} of tokens in no segment or keys not used", x, np.zeros(x.shape), 0.0, packed,
                          exact=np.ones(x.shape, bool))
    except AssertionError as error:
        raise _noted(error, case, None) from None
