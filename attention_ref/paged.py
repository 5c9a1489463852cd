"""Paged KV caches (SPEC.md rule 21): attention of new queries against a KV cache stored in pages and
read through a block table, as vLLM and FlashAttention's ``flash_attn_with_kvcache`` do.

Legend: ``N`` pages (``num_blocks``), ``P`` tokens a page (``page_size``), ``Hkv`` cache heads, ``E``
the q/k head dim, ``Ev`` v's, ``B`` sequences, ``M`` table entries a sequence (``max_blocks``).
Sequence b's logical cache is its first ``cache_seqlens[b]`` tokens, token j being
``cache[block_table[b, j // P], j % P]``. ``paged_attention`` gathers every sequence's logical cache
into one packed ``(total_k, Hkv, E)`` sequence and calls the backend's ``varlen_attention`` with
``alignment="bottom_right"``: it has no arithmetic of its own besides that gather (and, for the
gradients, the scatter back into the pages).
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from .result import AttentionOutput, Gradients
from .varlen import concrete_integers

__all__ = ["logical_cache_index", "paged_attention", "paged_attention_vjp", "paged_problem"]


def _backend(backend: Any, q: Any) -> Any:
    from .backends.base import Backend
    from .registry import backend_for, get_backend

    if backend is None:
        return backend_for(q)
    if isinstance(backend, str):
        return get_backend(backend)
    if not isinstance(backend, Backend):
        raise TypeError(f"backend must be a name, an attention_ref.Backend or None, got {type(backend).__name__}")
    return backend


def logical_cache_index(block_table: np.ndarray, cache_seqlens: np.ndarray, page_size: int) -> np.ndarray:
    """``(sum(cache_seqlens),)`` int64: for each sequence in turn, the rows of the flattened cache
    ``(N * P, ...)`` that hold its logical tokens 0, 1, ... ``cache_seqlens[b] - 1``:
    ``block_table[b, j // P] * P + j % P``. Assumes a checked table (``paged_problem``)."""
    parts = []
    for b, length in enumerate(cache_seqlens):
        j = np.arange(int(length))
        parts.append(block_table[b, j // page_size].astype(np.int64) * page_size + j % page_size)
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def paged_problem(q: Any, k_cache: Any, v_cache: Any, block_table: Any, cache_seqlens: Any, cu_seqlens_q: Any,
                  to_numpy: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The checks of ``paged_attention`` (rule 21; ValueError, naming the sequence where one is at
    fault) and its packed problem: ``(index, cu_seqlens_q, cu_seqlens_k)``, ``index`` the
    ``logical_cache_index`` into the flattened cache and the two ``(B + 1,)`` int64 segmentations
    (decode, ``cu_seqlens_q`` None: ``arange(B + 1)``). ``block_table``, ``cache_seqlens`` and
    ``cu_seqlens_q`` may be NumPy, lists or framework arrays (``to_numpy`` converts them; they must be
    concrete)."""
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if len(getattr(x, "shape", ())) != 4:
            raise ValueError(f"paged_attention: {name} must be (num_blocks, page_size, heads, head_dim), got shape "
                             f"{tuple(getattr(x, 'shape', ()))}")
    if tuple(k_cache.shape[:3]) != tuple(v_cache.shape[:3]):
        raise ValueError(f"paged_attention: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must "
                         "have the same blocks, page size and heads")
    if len(getattr(q, "shape", ())) != 3:
        raise ValueError(f"paged_attention: q must be (B, heads, head_dim) for decode or (total_q, heads, head_dim) "
                         f"with cu_seqlens_q, got shape {tuple(getattr(q, 'shape', ()))}")
    num_blocks, page_size = int(k_cache.shape[0]), int(k_cache.shape[1])
    table = concrete_integers(block_table, "block_table", to_numpy, "paged_attention")
    if table.ndim != 2 or not (np.issubdtype(table.dtype, np.integer) or table.size == 0):
        raise ValueError(f"paged_attention: block_table must be (B, max_blocks) integers, got shape {table.shape} "
                         f"and dtype {table.dtype}")
    batch, max_blocks = table.shape
    lengths = concrete_integers(cache_seqlens, "cache_seqlens", to_numpy, "paged_attention")
    if lengths.shape != (batch,) or not (np.issubdtype(lengths.dtype, np.integer) or lengths.size == 0):
        raise ValueError(f"paged_attention: cache_seqlens must be ({batch},) integers (one per row of block_table), "
                         f"got shape {lengths.shape} and dtype {lengths.dtype}")
    lengths = lengths.astype(np.int64)
    table = table.astype(np.int64)
    capacity = max_blocks * page_size
    for b in range(batch):
        if lengths[b] < 0:
            raise ValueError(f"paged_attention: cache_seqlens[{b}] = {int(lengths[b])} is negative (sequence {b})")
        if lengths[b] > capacity:
            raise ValueError(f"paged_attention: cache_seqlens[{b}] = {int(lengths[b])} is beyond the table's capacity "
                             f"of {capacity} tokens ({max_blocks} blocks of {page_size}) (sequence {b})")
        used = -(-int(lengths[b]) // page_size)
        bad = np.flatnonzero((table[b, :used] < 0) | (table[b, :used] >= num_blocks))
        if bad.size:
            m = int(bad[0])
            raise ValueError(f"paged_attention: block_table[{b}, {m}] = {int(table[b, m])} is outside the cache's "
                             f"{num_blocks} blocks (sequence {b})")
    if cu_seqlens_q is None:
        if int(q.shape[0]) != batch:
            raise ValueError(f"paged_attention: decode q has {int(q.shape[0])} queries but block_table has {batch} "
                             "sequences (pass cu_seqlens_q for several queries a sequence)")
        cu_q = np.arange(batch + 1, dtype=np.int64)
    else:
        cu_q = concrete_integers(cu_seqlens_q, "cu_seqlens_q", to_numpy, "paged_attention")
        if cu_q.shape != (batch + 1,):
            raise ValueError(f"paged_attention: cu_seqlens_q must be (B + 1,) = ({batch + 1},), one more than the "
                             f"sequences of block_table, got shape {cu_q.shape}")
    cu_k = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return logical_cache_index(table, lengths, page_size), cu_q, cu_k


def _gather(backend: Any, cache: Any, index: np.ndarray) -> Any:
    return _gather_rows(backend, cache.reshape(cache.shape[0] * cache.shape[1], *cache.shape[2:]), index)


def _scatter(backend: Any, packed: Any, index: np.ndarray, cache_shape: tuple[int, ...]) -> Any:
    """``(N, P, ...)``: each cache row the sum, in token order, of the packed rows gathered from it
    (0 when none). Written as ``sum_r packed[uses_r] * weight_r``, ``uses_r`` a row's r-th use and
    ``weight_r`` 1 where it has one, else 0: products by 0 and 1 are exact, so a row used once is an
    exact copy and a row used twice is the one rounding of the sum, on every framework and device."""
    rows = cache_shape[0] * cache_shape[1]
    dtype = backend.to_numpy(packed[:0]).dtype
    order = np.argsort(index, kind="stable")
    counts = np.bincount(index, minlength=rows)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    scope: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if backend.framework == "jax":  # float64 arithmetic only inside a scoped enable_x64 (rule 10)
        import jax

        scope = jax.enable_x64(True)
    with scope:
        total: Any = backend.asarray_like(np.zeros((rows, *packed.shape[1:]), dtype), packed)
        for r in range(int(counts.max(initial=0))):
            has = counts > r
            uses = np.where(has, order[np.minimum(first + r, index.size - 1)], 0)
            weight = has.astype(dtype).reshape(rows, *([1] * (len(packed.shape) - 1)))
            total = total + _gather_rows(backend, packed, uses) * backend.asarray_like(weight, packed)
        return total.reshape(*cache_shape[:2], *packed.shape[1:])


def _gather_rows(backend: Any, x: Any, index: np.ndarray) -> Any:
    return x[backend.asarray_like(index, x)] if backend.framework == "torch" else x[index]


def paged_attention(q: Any, k_cache: Any, v_cache: Any, block_table: Any, cache_seqlens: Any, *,
                    backend: Any = None, cu_seqlens_q: Any = None, scale: float | None = None, causal: bool = False,
                    softcap: float | None = None, window: tuple[int | None, int | None] | None = None,
                    return_lse: bool = False, compute_dtype: Any = None, block_q: int | None = None,
                    block_k: int | None = None, dense: bool = False) -> Any:
    """Attention against a paged KV cache (SPEC.md rule 21) on ``backend`` (default: q's framework).

    k_cache ``(N, P, Hkv, E)``, v_cache ``(N, P, Hkv, Ev)``, ``block_table`` ``(B, M)`` and
    ``cache_seqlens`` ``(B,)`` integers (concrete). Decode: q ``(B, Hq, E)``, one query a sequence.
    Chunked prefill: q packed ``(total_q, Hq, E)`` with ``cu_seqlens_q`` ``(B + 1,)``, sequence b's
    queries being the last ``L_b`` tokens of its cache. Causal and the window are bottom-right aligned
    within each sequence. Returns out in q's layout ``(total_q, Hq, Ev)`` and q's dtype, or
    ``AttentionOutput(out, None, lse)`` with lse ``(Hq, total_q)`` in the compute dtype."""
    impl = _backend(backend, q)
    index, cu_q, cu_k = paged_problem(q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q, impl.to_numpy)
    result = impl.varlen_attention(q, _gather(impl, k_cache, index), _gather(impl, v_cache, index), cu_q, cu_k,
                                   scale=scale, causal=causal, alignment="bottom_right", softcap=softcap,
                                   window=window, return_lse=return_lse, compute_dtype=compute_dtype,
                                   block_q=block_q, block_k=block_k, dense=dense)
    return AttentionOutput(*result) if return_lse else result


def paged_attention_vjp(q: Any, k_cache: Any, v_cache: Any, block_table: Any, cache_seqlens: Any, d_out: Any, *,
                        backend: Any = None, cu_seqlens_q: Any = None, scale: float | None = None,
                        causal: bool = False, softcap: float | None = None,
                        window: tuple[int | None, int | None] | None = None, compute_dtype: Any = None,
                        block_q: int | None = None, block_k: int | None = None, dense: bool = False) -> Gradients:
    """The gradients of ``sum(paged_attention(...) * d_out)`` (d_out in out's layout):
    ``Gradients(dq, dk_cache, dv_cache, None)``, dk/dv in the cache's shape, each cache slot's
    gradient the sum over every use of it (aliased pages), exactly 0 for slots no sequence reads."""
    impl = _backend(backend, q)
    index, cu_q, cu_k = paged_problem(q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q, impl.to_numpy)
    grads = impl.varlen_attention_vjp(q, _gather(impl, k_cache, index), _gather(impl, v_cache, index), cu_q, cu_k,
                                      d_out, scale=scale, causal=causal, alignment="bottom_right", softcap=softcap,
                                      window=window, compute_dtype=compute_dtype, block_q=block_q, block_k=block_k,
                                      dense=dense)
    return Gradients(grads.dq, _scatter(impl, grads.dk, index, tuple(k_cache.shape)),
                     _scatter(impl, grads.dv, index, tuple(v_cache.shape)), None)
