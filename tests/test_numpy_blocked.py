"""The NumPy backend's blocked algorithm (SPEC.md rule 19, ``attention_ref/backends/numpy_blocked.py``):
no array of the logits' size (tracemalloc), results that do not depend on the thread count (bit for
bit), only the key blocks causal and window leave visited, and results and gradients against the
float64 oracle within rule 19's bounds (``key_block=``), the dense path within twice them."""

from __future__ import annotations

import threading
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import attention_ref as ar
from attention_ref.backends import numpy_blocked
from attention_ref.backends.numpy import NumpyBackend
from attention_ref.plan import AttentionOptions
from attention_ref.testing.assertions import assert_attention_close, assert_gradients_close
from attention_ref.testing.cases import AttentionCase, call, call_vjp, random_cotangent
from attention_ref.validation import validate_attention_args

from .blocked_cases import (
    BLOCKED_CASES,
    assert_blocked_gradients_match_oracle_and_dense,
    assert_blocked_matches_oracle_and_dense,
    half_precision_case,
)
from .blocked_cases import random_inputs as _inputs
from .blocked_cases import tile as _blocks

BACKEND = ar.get_backend("numpy")
CASES = BLOCKED_CASES


@pytest.mark.parametrize("name", list(CASES))
def test_blocked_matches_the_oracle_and_the_dense_path(name: str) -> None:
    assert_blocked_matches_oracle_and_dense(BACKEND, *CASES[name])


@pytest.mark.parametrize("name", list(CASES))
def test_blocked_gradients_match_the_oracle_and_the_dense_path(name: str) -> None:
    assert_blocked_gradients_match_oracle_and_dense(BACKEND, *CASES[name])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_inputs_compute_in_float32(dtype: str) -> None:
    case = half_precision_case(dtype)
    blocked = call(BACKEND, case, return_lse=True, **_blocks(4, 4))
    assert blocked.out.dtype == case.q.dtype and blocked.lse.dtype == np.float32
    assert_attention_close(blocked, case, calibrated=False, key_block=4)
    d_out = random_cotangent(case, 3)
    grads = call_vjp(BACKEND, case, d_out, **_blocks(4, 4))
    assert grads.dq.dtype == case.q.dtype and grads.dbias.dtype == case.q.dtype
    assert_gradients_close(grads, case, d_out, calibrated=False, key_block=4)


@pytest.mark.parametrize(("q_len", "kv_len"), [(0, 5), (4, 0), (0, 0)])
def test_empty_sequences(q_len: int, kv_len: int) -> None:
    """L = 0: empty results; S = 0: out zeros, lse -inf, zero gradients (dbias included)."""
    q, k, v = _inputs(0, (2, 3, q_len, 4), (2, 3, kv_len, 4), 4, np.float64)
    bias = np.ones((3, q_len, kv_len))
    result = BACKEND.attention(q, k, v, bias=bias, return_lse=True, block_q=2, block_k=2)
    assert result.out.shape == (2, 3, q_len, 4) and result.lse.shape == (2, 3, q_len)
    assert np.array_equal(result.out, np.zeros_like(result.out))
    assert np.all(result.lse == -np.inf)
    grads = BACKEND.attention_vjp(q, k, v, np.ones((2, 3, q_len, 4)), bias=bias, block_q=2, block_k=2)
    for got, x in zip(grads, (q, k, v, bias), strict=True):
        assert got.shape == x.shape and not got.any()


# ---- memory --------------------------------------------------------------------------------------

#: One float64 head of 4096 queries and keys: its logits would be 128 MiB.
LONG = 4096


def _traced_peak(run: Callable[[], object]) -> int:
    """The largest memory (bytes) that NumPy arrays and Python objects held at once during ``run``,
    besides what was held before (tracemalloc, every thread)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        run()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - before


def test_no_array_of_the_logits_size() -> None:
    """rule 19: the blocked forward and backward never hold a ``(L, S)`` array: their traced peak is
    far below one float64 array of the logits (128 MiB), a few tiles of ``block_q x block_k`` and the
    ``(L, E)`` results; the dense path's peak is above it (so the measurement can fail)."""
    q, k, v = _inputs(8, (1, LONG, 8), (1, LONG, 8), 8, np.float64)
    d_out = np.random.default_rng(9).standard_normal(q.shape)
    logits_bytes = LONG * LONG * 8
    tile = _blocks(128, 256)  # a tile of 256 KiB: a default tile of 4 MiB would still pass
    forward = _traced_peak(lambda: BACKEND.attention(q, k, v, causal=True, **tile))
    backward = _traced_peak(lambda: BACKEND.attention_vjp(q, k, v, d_out, causal=True, **tile))
    assert forward < logits_bytes / 16, f"blocked forward peak {forward / 2**20:.1f} MiB"
    assert backward < logits_bytes / 8, f"blocked backward peak {backward / 2**20:.1f} MiB"
    dense = _traced_peak(lambda: BACKEND.attention(q, k, v, causal=True, dense=True))
    assert dense > logits_bytes, f"dense peak {dense / 2**20:.1f} MiB"


# ---- threads -------------------------------------------------------------------------------------


def _threaded_case() -> AttentionCase:
    """GQA with every option that reads a tile: broadcast bias and mask, a dropout mask, a softcap and
    a causal window, in float32."""
    rng = np.random.default_rng(12)
    q, k, v = _inputs(13, (2, 4, 70, 16), (2, 2, 90, 16), 12)
    return AttentionCase(q, k, v, bias=rng.standard_normal((4, 1, 90)).astype(np.float32),
                         mask=rng.random((2, 1, 70, 90)) > 0.2, dropout_p=0.1,
                         dropout_mask=rng.random((70, 90)) > 0.1, softcap=3.0, causal=True,
                         alignment="bottom_right", window=(40, None))


@pytest.mark.parametrize("bias_shape", [(4, 1, 90), (2, 4, 70, 90), (70, 1)])
def test_results_do_not_depend_on_the_thread_count(monkeypatch: pytest.MonkeyPatch,
                                                   bias_shape: tuple[int, ...]) -> None:
    """The same call with 1, 2 and 3 threads gives the same out, lse and gradients, bit for bit, and
    the pool really ran work items on several threads (each item slowed down a little)."""
    pytest.importorskip("threadpoolctl")  # the fast extra: without it, one thread runs every item
    monkeypatch.setattr(numpy_blocked, "POOL_WORK", 0)  # the pool even for a small call
    seen: set[int] = set()
    for name in ("_forward_item", "_backward_item"):
        original = getattr(numpy_blocked, name)

        def slowed(*args: Any, _original: Callable[..., None] = original) -> None:
            seen.add(threading.get_ident())
            time.sleep(0.001)
            _original(*args)

        monkeypatch.setattr(numpy_blocked, name, slowed)
    case = _threaded_case()
    case = case.replace(bias=np.random.default_rng(14).standard_normal(bias_shape).astype(np.float32))
    d_out = random_cotangent(case, 15)
    results = []
    for threads in (1, 2, 3):
        seen.clear()
        backend = NumpyBackend(threads=threads)
        result = call(backend, case, return_lse=True, **_blocks(8, 16))
        assert len(seen) == threads  # every thread of the pool took work items
        grads = call_vjp(backend, case, d_out, **_blocks(8, 16))
        results.append((result.out, result.lse, *grads))
    for other in results[1:]:
        for first, again in zip(results[0], other, strict=True):
            assert first.dtype == again.dtype and np.array_equal(first, again, equal_nan=True)


def test_threads_must_be_a_positive_int() -> None:
    for bad, error in ((0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="threads must be a positive int"):
            NumpyBackend(threads=bad)  # type: ignore[arg-type]


# ---- skipped key blocks --------------------------------------------------------------------------


@pytest.mark.parametrize("options", [dict(causal=True), dict(causal=True, alignment="bottom_right"),
                                     dict(window=(6, 2)), dict(window=(None, 0), alignment="bottom_right")])
def test_only_the_key_blocks_causal_and_window_leave_are_visited(monkeypatch: pytest.MonkeyPatch,
                                                                 options: dict[str, Any]) -> None:
    """rule 19: query block b visits exactly the key blocks ``plan.key_block_range`` gives, forward
    and backward (a key block that causal and window wholly exclude is skipped)."""
    visited: list[tuple[int, int, int]] = []
    original = numpy_blocked._Call.logits

    def recording(self: Any, ws: Any, idx: Any, q_tile: Any, qs: int, qe: int, ks: int, ke: int,
                  *args: Any, **kwargs: Any) -> np.ndarray:
        visited.append((qs, qe, ks))
        return original(self, ws, idx, q_tile, qs, qe, ks, ke, *args, **kwargs)

    monkeypatch.setattr(numpy_blocked._Call, "logits", recording)
    q, k, v = _inputs(16, (1, 20, 4), (1, 27, 4), 4, np.float64)
    block_q, block_k = 6, 5
    plan = validate_attention_args(q, k, v, AttentionOptions(**options), block_q=block_q, block_k=block_k)
    expected = set()
    for qs in range(0, 20, block_q):
        qe = min(20, qs + block_q)
        first, stop = plan.key_block_range(qs, qe)
        expected |= {(qs, qe, kb * block_k) for kb in range(first, stop)}
    assert len(expected) < plan.num_query_blocks * plan.num_key_blocks  # some blocks are skipped
    BACKEND.attention(q, k, v, **options, **_blocks(block_q, block_k))
    assert sorted(visited) == sorted(expected)
    visited.clear()
    BACKEND.attention_vjp(q, k, v, np.ones((1, 20, 4)), **options, **_blocks(block_q, block_k))
    assert sorted(set(visited)) == sorted(expected)  # the backward's forward, then its own pass
    assert len(visited) == 2 * len(expected)
