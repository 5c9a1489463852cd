"""rule 21: paged KV caches: ``paged_attention`` equals dense attention of each sequence on its logical
cache gathered through the block table (the float64 oracle of the sequence as a bottom-right case),
out 0 and lse -inf for query tokens in no sequence; and it does not depend on where the pages are
(pages permuted with the table remapped, entries past the used blocks and slots no sequence reads
redrawn).

Cases are ``attention_ref.testing.paged_strategies.paged_cases``; the implementation needs
``paged_attention`` (a method, as the checker's paged kernels have, or else
``attention_ref.paged.paged_attention`` with the implementation as backend; the feature ``paged``).
lse is compared where the implementation supports ``lse``.

PYTEST_DONT_REWRITE: pytest rewrites the asserts of a plugin's distribution (the ``pytest11``
entry point makes this package one); this module's assertion messages are reported as written.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st

from ...paged import paged_attention
from ...result import AttentionOutput
from ..assertions import assert_attention_close, assert_within, bounds_for
from ..implementation import Subject
from ..paged_strategies import PagedCase, paged_cases
from ..runner import attention_property
from ..strategies import Features
from ._common import SEEDS


def call_paged(subject: Subject, case: PagedCase) -> AttentionOutput:
    """The subject's paged attention on the case as NumPy: out in q's layout, lse ``(Hq, total_q)``
    (None when the subject does not support ``lse``)."""
    impl: Any = subject.impl
    return_lse = "lse" in subject.features
    call = getattr(impl, "paged_attention", None)
    arrays = (impl.asarray(case.q), impl.asarray(case.k_cache), impl.asarray(case.v_cache), case.block_table,
              case.cache_seqlens)
    if call is None:
        result = paged_attention(*arrays, backend=impl, **case.keywords(), return_lse=return_lse)
    else:
        result = call(*arrays, **case.keywords(), return_lse=return_lse)
    if not return_lse:
        return AttentionOutput(impl.to_numpy(result))
    return AttentionOutput(impl.to_numpy(result.out), None, impl.to_numpy(result.lse))


def _noted(error: AssertionError, case: PagedCase, b: int | None) -> AssertionError:
    """``error`` with a note naming the paged case (and sequence b, when one sequence's comparison failed)."""
    where = "" if b is None else f"sequence {b} of "
    error.add_note(f"{where}the paged case: {case!r}")
    return error


def _check_shapes(result: AttentionOutput, case: PagedCase) -> None:
    total_q, heads = case.q.shape[:2]
    shape = (total_q, heads, case.v_cache.shape[-1])
    assert result.out.shape == shape, f"out {result.out.shape}, expected {shape}\n  case: {case!r}"
    assert result.lse is None or result.lse.shape == (heads, total_q), (
        f"lse {result.lse.shape}, expected {(heads, total_q)}\n  case: {case!r}")
    assert result.out.dtype == case.q.dtype, f"out is {result.out.dtype}, expected {case.q.dtype}\n  case: {case!r}"


def _sequence_result(result: AttentionOutput, rows: slice) -> AttentionOutput:
    """The rows of one sequence, heads first (an ``AttentionCase``'s layout)."""
    return AttentionOutput(result.out[rows].swapaxes(0, 1), None, None if result.lse is None else result.lse[:, rows])


def _strategy(features: Features) -> st.SearchStrategy[PagedCase]:
    return paged_cases(features)


def _with_seeds(features: Features) -> st.SearchStrategy[tuple[PagedCase, int]]:
    return st.tuples(paged_cases(features), SEEDS)


@attention_property("paged_equals_dense_on_gathered_cache", (21,), strategy=_strategy, requires=("paged",))
def paged_equals_dense_on_gathered_cache(subject: Subject, case: PagedCase) -> None:
    """paged_attention's out (and lse) equal each sequence's dense attention on its logical cache
    gathered through the table, bottom-right aligned (its float64 oracle, within the tolerance rule);
    out 0 and lse -inf for query tokens in no sequence."""
    result = call_paged(subject, case)
    _check_shapes(result, case)
    for b in range(case.num_sequences):
        rows = case.query_rows(b)
        if rows.stop == rows.start:
            continue
        try:
            assert_attention_close(_sequence_result(result, rows), case.sequence(b), calibrated=subject.calibrated)
        except AssertionError as error:
            raise _noted(error, case, b) from None
    outside = case.outside_queries()
    out = result.out[outside]
    first = case.sequence(0)
    try:
        assert_within("out of query tokens in no sequence", out, np.zeros(out.shape), 0.0, first,
                      exact=np.ones(out.shape, bool))
        if result.lse is not None:
            lse = result.lse[:, outside]
            assert_within("lse of query tokens in no sequence", lse, np.full(lse.shape, -np.inf), 0.0, first)
    except AssertionError as error:
        raise _noted(error, case, None) from None


@attention_property("paged_is_invariant_to_page_permutation", (21,), strategy=_with_seeds, requires=("paged",))
def paged_is_invariant_to_page_permutation(subject: Subject, example: tuple[PagedCase, int]) -> None:
    """Moving the pages (a permutation of the cache's pages with the table remapped, the entries past
    the used blocks and the slots no sequence reads redrawn) changes neither out nor lse: bit for bit
    for SPEC.md's implementations (the gather is exact), and within twice each sequence's bound for
    other people's kernels (two results of one kernel, which may schedule pages by their number)."""
    case, seed = example
    moved = case.moved(np.random.default_rng(seed))
    before, after = call_paged(subject, case), call_paged(subject, moved)
    _check_shapes(before, case)
    _check_shapes(after, moved)
    what = "after moving the pages"
    for b in range(case.num_sequences):
        rows = case.query_rows(b)
        if rows.stop == rows.start:
            continue
        sequence = case.sequence(b)
        exact = not subject.calibrated
        bounds = bounds_for(subject, sequence)
        first, second = _sequence_result(before, rows), _sequence_result(after, rows)
        try:
            assert_within(f"out of sequence {b} {what}", second.out, first.out, 0.0 if exact else 2 * bounds.out,
                          sequence, exact=np.full(first.out.shape, exact))
            if first.lse is not None and second.lse is not None:
                assert_within(f"lse of sequence {b} {what}", second.lse, first.lse,
                              0.0 if exact else 2 * bounds.lse, sequence, exact=np.full(first.lse.shape, exact))
        except AssertionError as error:
            raise _noted(error, moved, b) from None
