"""Kernels with a paged KV-cache interface (``check(..., interface="paged")``, SPEC.md rule 21) seen
through the checker's two calls.

A paged kernel is called as ``fn(q, k_cache, v_cache, block_table, cache_seqlens, *,
cu_seqlens_q=None, max_seqlen_q=..., **keywords)``: q ``(B, Hq, E)`` for decode (``cu_seqlens_q``
not passed) or packed ``(total_q, Hq, E)`` with ``cu_seqlens_q`` ``(B + 1,)``, k_cache ``(N, P,
Hkv, E)``, v_cache ``(N, P, Hkv, Ev)``, ``block_table`` ``(B, M)`` and ``cache_seqlens`` ``(B,)``;
the integer arrays int32 arrays of its framework on q's device, ``max_seqlen_q`` an int; and the
spec's keywords of its declared features (``scale``, ``causal``, ``softcap``, ``window``,
``return_lse``; causal and the window are always bottom-right, there is no alignment keyword). It
returns out in q's layout, or ``(out, lse)`` with ``return_lse``, lse ``(Hq, total_q)``.

* ``dense_through_paged(fn, backend, window=...)`` is a kernel of the dense calling convention: a dense
  call ``(*B, Hq, L, E)`` is a batch of ``prod(B)`` sequences, sequence b's cache the S keys of row b
  in pages of ``DENSE_PAGE_SIZE`` tokens placed in reverse order, its table padded with a ``-1``
  entry, and its L queries the chunk (decode when L = 1), so that every property of dense attention
  checks the paged kernel too. A top-left causal or window case with L != S is converted to an
  equal bottom-right problem (``top_left_as_bottom_right``);
* ``call_paged`` runs the kernel on a paged problem as ``attention_ref.paged.paged_attention`` takes it.

A paged kernel has no mask, bias, dropout or weights, and its gradients are not checked: declaring
any of them is a ValueError.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .varlen_kernels import NOT_VARLEN, int32_like

#: Features the paged interface cannot have.
NOT_PAGED = NOT_VARLEN
#: Tokens a page of the cache a dense case is stored in.
DENSE_PAGE_SIZE = 3


def check_paged_supports(supports: tuple[str, ...] | list[str]) -> None:
    """ValueError for a declared feature that the paged interface has no argument or result for."""
    refused = [feature for feature in supports if feature in NOT_PAGED]
    if refused:
        raise ValueError(f"interface='paged' has no {', '.join(refused)}: a paged kernel takes q, k_cache, v_cache, "
                         "block_table, cache_seqlens, cu_seqlens_q and the keywords scale, causal, softcap, window, "
                         "return_lse")


def _take(backend: Any, x: Any, index: np.ndarray, axis: int) -> Any:
    """``x`` indexed by the integer ``index`` along ``axis`` (any framework)."""
    where = backend.asarray_like(np.asarray(index, np.int64), x) if backend.framework == "torch" else index
    return x[(slice(None),) * (axis % len(x.shape)) + (where,)]


def call_paged(fn: Callable[..., Any], backend: Any, q: Any, k_cache: Any, v_cache: Any, block_table: np.ndarray,
               cache_seqlens: np.ndarray, cu_seqlens_q: np.ndarray | None, keywords: dict[str, Any]) -> Any:
    """The kernel's result on a paged problem: framework arrays q and the caches, NumPy table, lengths
    and ``cu_seqlens_q`` (None: decode), passed as int32 arrays on q's device with ``max_seqlen_q``."""
    table, lengths = np.asarray(block_table), np.asarray(cache_seqlens)
    extra: dict[str, Any] = {"max_seqlen_q": 1 if cu_seqlens_q is None else int(np.diff(cu_seqlens_q).max(initial=0))}
    if cu_seqlens_q is not None:
        extra["cu_seqlens_q"] = int32_like(backend, np.asarray(cu_seqlens_q), q)
    return fn(q, k_cache, v_cache, int32_like(backend, table, q), int32_like(backend, lengths, q), **extra,
              **keywords)


def top_left_as_bottom_right(length: int, keys: int, causal: bool, window: tuple[int | None, int | None] | None,
                             has_window: bool) -> str:
    """How a top-left causal/window problem of ``length`` queries and ``keys`` keys becomes bottom-right
    (the only alignment of the paged interface), exactly: "same" (no positional rule, no query, or
    L = S: both alignments agree); "reversed" (with the window feature: queries and keys in reverse
    order, window ``(l, r)`` as ``(r, l)`` and causal as a left side of 0, bottom-right);
    "padded" (causal alone, L < S: S - L queries appended, their results dropped); "split" (causal
    alone, L > S: the first S queries as they are, the others, which see every key, without causal)."""
    if not (causal or window is not None) or length == 0 or length == keys:
        return "same"
    if has_window:
        return "reversed"
    return "padded" if length < keys else "split"


def dense_through_paged(fn: Callable[..., Any], backend: Any, *, window: bool) -> Callable[..., Any]:
    """A kernel of the dense convention (q ``(*B, Hq, L, E)`` or rank 2; keywords with ``alignment``;
    out, or ``(out, None, lse)`` with ``return_lse``) that runs the paged kernel ``fn`` on the batch
    of ``prod(B)`` sequences (module docstring). ``window``: the kernel takes ``window``."""

    def run(q: Any, k: Any, v: Any, keywords: dict[str, Any]) -> tuple[Any, Any]:
        """out ``(N, Hq, L, Ev)`` and lse ``(N, Hq, L)`` (or None) of rows q ``(N, Hq, L, E)``, k and v
        ``(N, Hkv, S, E|Ev)``, bottom-right."""
        (rows, hq, length, e), (hkv, keys, ev) = q.shape, v.shape[1:]
        pages = -(-keys // DENSE_PAGE_SIZE)
        total = rows * pages
        # Physical page p holds logical page (b, j) = divmod(total - 1 - p, pages): reverse placement.
        logical = total - 1 - np.arange(total)
        b, j = np.divmod(logical, max(pages, 1))
        slot = j[:, None] * DENSE_PAGE_SIZE + np.arange(DENSE_PAGE_SIZE)[None, :]
        flat = (b[:, None] * keys + np.minimum(slot, max(keys - 1, 0))).reshape(-1)  # past S: a copy, never read

        def cache(x: Any, width: int) -> Any:  # (N, Hkv, S, W) -> (total, P, Hkv, W)
            tokens = x.swapaxes(1, 2).reshape(rows * keys, hkv, width)
            return _take(backend, tokens, flat, 0).reshape(total, DENSE_PAGE_SIZE, hkv, width)

        table = np.full((rows, pages + 1), -1, np.int64)
        table[:, :pages] = total - 1 - (np.arange(rows)[:, None] * pages + np.arange(pages)[None, :])
        lengths = np.full(rows, keys, np.int64)
        decode = length == 1
        packed = q.swapaxes(1, 2).reshape(rows * length, hq, e)
        result = call_paged(fn, backend, packed, cache(k, e), cache(v, ev), table, lengths,
                            None if decode else np.arange(rows + 1) * length, keywords)
        out, lse = (result[0], result[1]) if isinstance(result, tuple | list) else (result, None)
        out = out.reshape(rows, length, hq, ev).swapaxes(1, 2)
        if lse is not None:  # (Hq, N * L) -> (N, Hq, L)
            lse = lse.reshape(hq, rows, length).swapaxes(0, 1)
        return out, lse

    def aligned(q: Any, k: Any, v: Any, keywords: dict[str, Any]) -> tuple[Any, Any]:
        """``run`` at the dense keywords' alignment (top-left converted, ``top_left_as_bottom_right``)."""
        alignment = keywords.pop("alignment", "top_left")
        length, keys = int(q.shape[2]), int(k.shape[2])
        causal, win = keywords.get("causal", False), keywords.get("window")
        how = "same" if alignment == "bottom_right" else top_left_as_bottom_right(length, keys, causal, win, window)
        if how == "same":
            return run(q, k, v, keywords)
        if how == "reversed":
            left, right = (None, None) if win is None else win
            flipped = {**keywords, "window": (0 if causal else right, left)}
            flipped.pop("causal", None)
            back_q, back_k = np.arange(length)[::-1].copy(), np.arange(keys)[::-1].copy()
            out, lse = run(_take(backend, q, back_q, 2), _take(backend, k, back_k, 2), _take(backend, v, back_k, 2),
                           flipped)
            return _take(backend, out, back_q, 2), None if lse is None else _take(backend, lse, back_q, 2)
        if how == "padded":
            index = np.concatenate([np.arange(length), np.zeros(keys - length, np.int64)])
            out, lse = run(_take(backend, q, index, 2), k, v, keywords)
            kept = np.arange(length)
            return _take(backend, out, kept, 2), None if lse is None else _take(backend, lse, kept, 2)
        first = run(_take(backend, q, np.arange(keys), 2), k, v, keywords) if keys else None
        rest = run(_take(backend, q, np.arange(keys, length), 2), k, v, {**keywords, "causal": False})
        return _joined(backend, first, rest)

    def dense(q: Any, k: Any, v: Any, **keywords: Any) -> Any:
        rank2 = len(q.shape) == 2
        if rank2:
            q, k, v = q[None], k[None], v[None]
        lead = tuple(q.shape[:-3])
        rows = math.prod(lead)
        shaped = [x.reshape(rows, *x.shape[-3:]) for x in (q, k, v)]
        out, lse = aligned(shaped[0], shaped[1], shaped[2], dict(keywords))
        out = out.reshape(*lead, *out.shape[-3:])
        lse = None if lse is None else lse.reshape(*lead, *lse.shape[-2:])
        if rank2:
            out, lse = out[0], None if lse is None else lse[0]
        return (out, None, lse) if "return_lse" in keywords else out

    dense.__name__ = getattr(fn, "__name__", "paged_kernel")
    return dense


def _joined(backend: Any, first: tuple[Any, Any] | None, rest: tuple[Any, Any]) -> tuple[Any, Any]:
    """The query axis (2) of two ``run`` results joined (``first`` None: no queries)."""
    if first is None:
        return rest
    parts = [backend.to_numpy(x) for x in (first[0], rest[0])]
    out = backend.asarray_like(np.concatenate(parts, axis=2), rest[0])
    if rest[1] is None or first[1] is None:
        return out, None
    lse = np.concatenate([backend.to_numpy(first[1]), backend.to_numpy(rest[1])], axis=2)
    return out, backend.asarray_like(lse, rest[1])
