"""Paged KV caches (SPEC.md rule 21): attention through a block table equals dense attention on each
sequence's logical cache, built here with plain loops, bottom-right aligned, on every backend."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import attention_ref as ar
from attention_ref.paged import paged_attention, paged_attention_vjp
from attention_ref.testing import AttentionCase, assert_attention_close, assert_gradients_close

from .conftest import BACKENDS, backend_on_device

PAGE, BLOCKS, HQ, HKV, E, EV = 4, 10, 4, 2, 5, 3
#: Lengths that are not page multiples, an empty cache, and (sequence 3, chunked) more queries than
#: cached tokens; -1 pads the entries no sequence uses.
CACHE_SEQLENS = np.array([7, 0, 12, 2, 1])
TABLE = np.array([[6, 2, -1, -1], [-1, -1, -1, -1], [0, 9, 4, 7], [3, -1, -1, -1], [8, 5, 1, -1]])
CU_Q = np.array([0, 3, 3, 8, 11, 12])  # chunked prefill: 3, 0, 5, 3 and 1 queries


def _cache(seed: int = 0, dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((BLOCKS, PAGE, HKV, E)).astype(dtype),
            rng.standard_normal((BLOCKS, PAGE, HKV, EV)).astype(dtype))


def _logical(cache: np.ndarray, table: np.ndarray, b: int, length: int) -> np.ndarray:
    """Sequence b's logical cache ``(length, Hkv, ...)``, token by token."""
    tokens = [cache[table[b, j // PAGE], j % PAGE] for j in range(length)]
    return np.stack(tokens) if tokens else np.zeros((0, *cache.shape[2:]), cache.dtype)


def _sequence_case(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, table: np.ndarray,
                   lengths: np.ndarray, cu_q: np.ndarray, b: int, **options: Any) -> AttentionCase:
    rows = slice(cu_q[b], cu_q[b + 1])
    k, v = (_logical(c, table, b, int(lengths[b])).swapaxes(0, 1) for c in (k_cache, v_cache))
    return AttentionCase(q=q[rows].swapaxes(0, 1), k=k, v=v, alignment="bottom_right", **options)


def _check_every_sequence(result: Any, impl: Any, q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray,
                          table: np.ndarray, lengths: np.ndarray, cu_q: np.ndarray, **options: Any) -> None:
    out, lse = impl.to_numpy(result.out), impl.to_numpy(result.lse)
    assert out.shape == (q.shape[0], HQ, EV) and out.dtype == q.dtype and lse.shape == (HQ, q.shape[0])
    for b in range(lengths.size):
        rows = slice(cu_q[b], cu_q[b + 1])
        if rows.stop == rows.start:
            continue
        if lengths[b] == 0:  # an empty cache: a fully excluded row (rule 8)
            assert np.all(out[rows] == 0) and np.all(lse[:, rows] == -np.inf)
            continue
        case = _sequence_case(q, k_cache, v_cache, table, lengths, cu_q, b, **options)
        assert_attention_close(ar.AttentionOutput(out[rows].swapaxes(0, 1), None, lse[:, rows]), case,
                               calibrated=False)


OPTIONS = [dict(), dict(causal=True), dict(causal=True, window=(2, 0)), dict(window=(1, 1), softcap=2.0, scale=0.7)]


def _ids(options: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items()) or "plain"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", OPTIONS, ids=_ids)
def test_decode_equals_dense_attention_on_the_logical_cache(backend: str, options: dict[str, Any]) -> None:
    impl = backend_on_device(backend)
    k_cache, v_cache = _cache()
    q = np.random.default_rng(1).standard_normal((CACHE_SEQLENS.size, HQ, E)).astype("float32")
    result = paged_attention(impl.asarray(q), impl.asarray(k_cache), impl.asarray(v_cache), TABLE, CACHE_SEQLENS,
                             backend=impl, return_lse=True, **options)
    _check_every_sequence(result, impl, q, k_cache, v_cache, TABLE, CACHE_SEQLENS,
                          np.arange(CACHE_SEQLENS.size + 1), **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", OPTIONS, ids=_ids)
def test_chunked_prefill_queries_are_the_last_tokens_of_the_cache(backend: str, options: dict[str, Any]) -> None:
    impl = backend_on_device(backend)
    k_cache, v_cache = _cache()
    q = np.random.default_rng(2).standard_normal((CU_Q[-1], HQ, E)).astype("float32")
    result = paged_attention(impl.asarray(q), impl.asarray(k_cache), impl.asarray(v_cache), impl.asarray(TABLE),
                             impl.asarray(CACHE_SEQLENS), backend=impl, cu_seqlens_q=CU_Q, return_lse=True,
                             **options)
    _check_every_sequence(result, impl, q, k_cache, v_cache, TABLE, CACHE_SEQLENS, CU_Q, **options)
    if options.get("causal"):  # sequence 3: 3 queries, 2 cached tokens: the first query sees nothing (rule 7)
        out, lse = impl.to_numpy(result.out), impl.to_numpy(result.lse)
        assert np.all(out[CU_Q[3]] == 0) and np.all(lse[:, CU_Q[3]] == -np.inf)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_page_permutation_changes_nothing(backend: str) -> None:
    impl = backend_on_device(backend)
    k_cache, v_cache = _cache()
    q = np.random.default_rng(3).standard_normal((CU_Q[-1], HQ, E)).astype("float32")
    permutation = np.random.default_rng(4).permutation(BLOCKS)
    k_moved, v_moved = np.empty_like(k_cache), np.empty_like(v_cache)
    k_moved[permutation], v_moved[permutation] = k_cache, v_cache  # page i now lives at permutation[i]
    table = np.where(TABLE >= 0, permutation[TABLE], -1)
    runs = [paged_attention(impl.asarray(q), impl.asarray(kc), impl.asarray(vc), t, CACHE_SEQLENS, backend=impl,
                            cu_seqlens_q=CU_Q, causal=True, return_lse=True)
            for kc, vc, t in ((k_cache, v_cache, TABLE), (k_moved, v_moved, table))]
    assert not np.array_equal(table, TABLE)
    for before, after in zip(runs[0], runs[1], strict=True):
        if before is not None:  # the gathered logical caches are the same values: the same result, bit for bit
            assert np.array_equal(impl.to_numpy(before), impl.to_numpy(after))


#: Sequences 0 and 1 share their first page (a common prefix); sequence 2 reads page 5 twice.
ALIASED_TABLE = np.array([[3, 1, -1], [3, 6, 0], [5, 5, 2]])
ALIASED_SEQLENS = np.array([6, 9, 10])
ALIASED_CU_Q = np.array([0, 2, 3, 6])


@pytest.mark.parametrize("backend", BACKENDS)
def test_aliased_pages_give_each_sequence_its_own_answer(backend: str) -> None:
    impl = backend_on_device(backend)
    k_cache, v_cache = _cache(5)
    q = np.random.default_rng(6).standard_normal((ALIASED_CU_Q[-1], HQ, E)).astype("float32")
    result = paged_attention(impl.asarray(q), impl.asarray(k_cache), impl.asarray(v_cache), ALIASED_TABLE,
                             ALIASED_SEQLENS, backend=impl, cu_seqlens_q=ALIASED_CU_Q, causal=True, return_lse=True)
    _check_every_sequence(result, impl, q, k_cache, v_cache, ALIASED_TABLE, ALIASED_SEQLENS, ALIASED_CU_Q,
                          causal=True)


def test_a_window_of_n_keys_is_vllm_sliding_window() -> None:
    """vLLM's ``sliding_window=3``: the query and the 2 keys before it, i.e. ``window=(2, 0)`` causal."""
    k_cache, v_cache = _cache(7, "float64")
    q = np.random.default_rng(8).standard_normal((1, HQ, E))
    table, lengths = np.array([[4, 2]]), np.array([7])
    out = paged_attention(q, k_cache, v_cache, table, lengths, backend="numpy", causal=True, window=(2, 0))
    k, v = (_logical(c, table, 0, 7)[-3:].swapaxes(0, 1) for c in (k_cache, v_cache))
    expected = ar.attention(q.swapaxes(0, 1), k, v, backend="numpy")  # the last 3 keys, no mask
    np.testing.assert_allclose(out.swapaxes(0, 1), expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_are_the_sequences_gradients_scattered_into_the_pages(backend: str) -> None:
    impl = backend_on_device(backend)
    k_cache, v_cache = _cache(9, "float64")
    rng = np.random.default_rng(10)
    q, d_out = rng.standard_normal((CU_Q[-1], HQ, E)), rng.standard_normal((CU_Q[-1], HQ, EV))
    grads = paged_attention_vjp(*map(impl.asarray, (q, k_cache, v_cache)), TABLE, CACHE_SEQLENS, impl.asarray(d_out),
                                backend=impl, cu_seqlens_q=CU_Q, causal=True)
    dq, dk, dv = (impl.to_numpy(x) for x in grads[:3])
    assert grads.dbias is None and dq.shape == q.shape and dk.shape == k_cache.shape and dv.shape == v_cache.shape
    read = np.zeros((BLOCKS, PAGE), bool)
    for b in range(CACHE_SEQLENS.size):
        rows, length = slice(CU_Q[b], CU_Q[b + 1]), int(CACHE_SEQLENS[b])
        slots = [(TABLE[b, j // PAGE], j % PAGE) for j in range(length)]
        for slot in slots:
            read[slot] = True
        if rows.stop == rows.start or length == 0:
            assert np.all(dq[rows] == 0)
            continue
        case = _sequence_case(q, k_cache, v_cache, TABLE, CACHE_SEQLENS, CU_Q, b, causal=True)
        mine = ar.Gradients(dq[rows].swapaxes(0, 1), np.stack([dk[s] for s in slots]).swapaxes(0, 1),
                            np.stack([dv[s] for s in slots]).swapaxes(0, 1), None)
        assert_gradients_close(mine, case, d_out[rows].swapaxes(0, 1), calibrated=False)
    assert np.all(dk[~read] == 0) and np.all(dv[~read] == 0)  # slots no sequence reads


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_of_an_aliased_page_are_summed_over_its_uses(backend: str) -> None:
    """The aliased cache against the same logical caches with every use on a page of its own: the
    gradients of each use are the same (the same packed problem), and an aliased slot, used at most
    twice here, gets their sum, the one rounding NumPy gives."""
    impl = backend_on_device(backend)
    k_cache, v_cache = _cache(11, "float64")
    rng = np.random.default_rng(12)
    q, d_out = rng.standard_normal((ALIASED_CU_Q[-1], HQ, E)), rng.standard_normal((ALIASED_CU_Q[-1], HQ, EV))
    uses = [(b, m) for b in range(3) for m in range(-(-ALIASED_SEQLENS[b] // PAGE))]
    own_table = np.full(ALIASED_TABLE.shape, -1)
    k_own, v_own = np.zeros((len(uses), PAGE, HKV, E)), np.zeros((len(uses), PAGE, HKV, EV))
    for page, (b, m) in enumerate(uses):
        own_table[b, m] = page
        k_own[page], v_own[page] = k_cache[ALIASED_TABLE[b, m]], v_cache[ALIASED_TABLE[b, m]]
    options: dict[str, Any] = dict(backend=impl, cu_seqlens_q=ALIASED_CU_Q, causal=True)
    aliased = paged_attention_vjp(*map(impl.asarray, (q, k_cache, v_cache)), ALIASED_TABLE, ALIASED_SEQLENS,
                                  impl.asarray(d_out), **options)
    own = paged_attention_vjp(*map(impl.asarray, (q, k_own, v_own)), own_table, ALIASED_SEQLENS, impl.asarray(d_out),
                              **options)
    assert np.array_equal(impl.to_numpy(aliased.dq), impl.to_numpy(own.dq))
    for got, per_use in ((aliased.dk, own.dk), (aliased.dv, own.dv)):
        expected = np.zeros(impl.to_numpy(got).shape)
        for page, (b, m) in enumerate(uses):
            expected[ALIASED_TABLE[b, m]] += impl.to_numpy(per_use)[page]
        assert np.array_equal(impl.to_numpy(got), expected)
        assert np.any(impl.to_numpy(got)[3] != impl.to_numpy(per_use)[0])  # page 3's two uses both count


BAD = [
    (dict(table=[[6, 2, -1, -1], [-1, -1, -1, -1], [0, 9, 10, 7], [3, -1, -1, -1], [8, 5, 1, -1]]),
     r"block_table\[2, 2\] = 10 is outside the cache's 10 blocks \(sequence 2\)"),
    (dict(table=[[6, -1, -1, -1], [-1, -1, -1, -1], [0, 9, 4, 7], [3, -1, -1, -1], [8, 5, 1, -1]]),
     r"block_table\[0, 1\] = -1 is outside the cache's 10 blocks \(sequence 0\)"),
    (dict(lengths=[7, 0, 17, 2, 1]),
     r"cache_seqlens\[2\] = 17 is beyond the table's capacity of 16 tokens \(4 blocks of 4\) \(sequence 2\)"),
    (dict(lengths=[7, -1, 12, 2, 1]), r"cache_seqlens\[1\] = -1 is negative \(sequence 1\)"),
    (dict(lengths=[7, 0, 12, 2]), r"cache_seqlens must be \(5,\) integers"),
    (dict(lengths=[7.0, 0, 12, 2, 1]), r"cache_seqlens must be \(5,\) integers"),
    (dict(table=[6, 2, -1, -1]), r"block_table must be \(B, max_blocks\) integers"),
    (dict(q_tokens=4), "decode q has 4 queries but block_table has 5 sequences"),
    (dict(cu_q=[0, 3, 12]), r"cu_seqlens_q must be \(B \+ 1,\) = \(6,\)"),
    (dict(k_rank=3), r"k_cache must be \(num_blocks, page_size, heads, head_dim\)"),
    (dict(v_page=2), "k_cache .* and v_cache .* must have the same blocks, page size and heads"),
]


@pytest.mark.parametrize(("bad", "message"), BAD, ids=lambda x: x if isinstance(x, str) else "-".join(x))
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_tables_and_shapes_are_the_same_error_everywhere(backend: str, bad: dict[str, Any], message: str) -> None:
    impl = backend_on_device(backend)
    k_cache, v_cache = _cache()
    if "k_rank" in bad:
        k_cache = k_cache[0]
    if "v_page" in bad:
        v_cache = v_cache[:, :2]
    q = np.zeros((bad.get("q_tokens", CACHE_SEQLENS.size), HQ, E), np.float32)
    with pytest.raises(ValueError, match=message):
        paged_attention(*map(impl.asarray, (q, k_cache, v_cache)), np.array(bad.get("table", TABLE)),
                        np.array(bad.get("lengths", CACHE_SEQLENS)), backend=impl,
                        cu_seqlens_q=None if "cu_q" not in bad else np.array(bad["cu_q"]))


def test_entries_beyond_the_cache_length_are_never_read() -> None:
    k_cache, v_cache = _cache(13)
    q = np.random.default_rng(14).standard_normal((CACHE_SEQLENS.size, HQ, E)).astype("float32")
    junk = np.where(TABLE >= 0, TABLE, 123)
    junk[2, 3] = -7  # sequence 2 (12 tokens) reads 3 pages only
    runs = [paged_attention(q, k_cache, v_cache, t, CACHE_SEQLENS, backend="numpy", return_lse=True)
            for t in (TABLE, junk)]
    assert np.array_equal(runs[0].out, runs[1].out) and np.array_equal(runs[0].lse, runs[1].lse)


def test_traced_tables_are_refused_under_jit() -> None:
    jax = pytest.importorskip("jax")
    k_cache, v_cache = (jax.numpy.asarray(x) for x in _cache())
    q = jax.numpy.zeros((CACHE_SEQLENS.size, HQ, E))

    @jax.jit
    def run(table: Any) -> Any:
        return paged_attention(q, k_cache, v_cache, table, CACHE_SEQLENS)

    with pytest.raises(ValueError, match="block_table must be concrete integers"):
        run(jax.numpy.asarray(TABLE))
