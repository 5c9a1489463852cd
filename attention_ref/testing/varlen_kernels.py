"""Kernels with FlashAttention's packed variable-length interface (``check(..., interface="varlen")``,
SPEC.md rule 20) seen through the checker's two calls.

A varlen kernel is called as ``fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=...,
max_seqlen_k=..., **keywords)``: q ``(total_q, Hq, E)``, k ``(total_k, Hkv, E)``, v ``(total_k,
Hkv, Ev)``, ``cu_seqlens`` int32 arrays of its framework on q's device, the longest segment's
lengths as ints, and the spec's keywords of its declared features (``scale``, ``causal`` with
``alignment`` when it declares ``bottom_right``, ``softcap``, ``window``, ``return_lse``). It returns
out ``(total_q, Hq, Ev)``, or ``(out, lse)`` with ``return_lse``, lse ``(Hq, total_q)``.

* ``dense_through_varlen(fn, backend)`` is a kernel of the dense calling convention: a dense call
  ``(*B, Hq, L, E)`` is the packed batch of its ``prod(B)`` rows, one segment each, so that every
  property of dense attention checks the varlen kernel too (its segmentation: equal lengths);
* ``call_varlen`` runs the kernel on a packed problem as ``Backend.varlen_attention`` takes it, so
  that the varlen properties (drawn segmentations, empty segments, tokens in no segment) check it.

A varlen kernel has no mask, bias, dropout or weights, and its gradients are not checked yet (the
varlen gradient property needs a ``varlen_attention_vjp`` of the kernel): declaring any of them is a
ValueError.

PYTEST_DONT_REWRITE: pytest rewrites the asserts of a plugin's distribution (the ``pytest11``
entry point makes this package one); this module's assertion messages are reported as written.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Features the varlen interface cannot have.
NOT_VARLEN = ("mask", "bias", "dropout", "weights", "grad", "dbias")


def check_varlen_supports(supports: tuple[str, ...] | list[str]) -> None:
    """ValueError for a declared feature that the varlen interface has no argument or result for."""
    refused = [feature for feature in supports if feature in NOT_VARLEN]
    if refused:
        raise ValueError(f"interface='varlen' has no {', '.join(refused)}: a varlen kernel takes q, k, v, "
                         "cu_seqlens_q, cu_seqlens_k and the keywords scale, causal, alignment, softcap, window, "
                         "return_lse")


def int32_like(backend: Any, values: np.ndarray, like: Any) -> Any:
    """``values`` as int32 in the backend's framework, where ``like`` is (the integer arrays a varlen or paged
    kernel is given)."""
    return backend.asarray_like(np.ascontiguousarray(values, dtype=np.int32), like)


def call_varlen(fn: Callable[..., Any], backend: Any, q: Any, k: Any, v: Any, cu_seqlens_q: np.ndarray,
                cu_seqlens_k: np.ndarray, keywords: dict[str, Any]) -> Any:
    """The kernel's result on a packed problem: framework arrays q, k, v, NumPy ``cu_seqlens``
    (passed as int32 arrays on q's device, with ``max_seqlen_q``/``max_seqlen_k``)."""
    cu_q, cu_k = np.asarray(cu_seqlens_q), np.asarray(cu_seqlens_k)
    return fn(q, k, v, int32_like(backend, cu_q, q), int32_like(backend, cu_k, q),
              max_seqlen_q=int(np.diff(cu_q).max(initial=0)), max_seqlen_k=int(np.diff(cu_k).max(initial=0)),
              **keywords)


def dense_through_varlen(fn: Callable[..., Any], backend: Any) -> Callable[..., Any]:
    """A kernel of the dense convention (q ``(*B, Hq, L, E)`` or rank 2; out, or ``(out, None, lse)``
    with ``return_lse``) that runs the varlen kernel ``fn`` on the packed batch: each of the
    ``prod(B)`` rows is a segment of L queries and S keys."""

    def dense(q: Any, k: Any, v: Any, **keywords: Any) -> Any:
        rank2 = len(q.shape) == 2
        if rank2:
            q, k, v = q[None], k[None], v[None]
        lead = tuple(q.shape[:-3])
        rows = math.prod(lead)
        (hq, q_len, e), (hkv, kv_len, ev) = q.shape[-3:], v.shape[-3:]

        def packed(x: Any, heads: int, length: int, width: int) -> Any:  # (*B, H, L, E) -> (N * L, H, E)
            return x.reshape(rows, heads, length, width).swapaxes(1, 2).reshape(rows * length, heads, width)

        result = call_varlen(fn, backend, packed(q, hq, q_len, e), packed(k, hkv, kv_len, e),
                             packed(v, hkv, kv_len, ev), np.arange(rows + 1) * q_len, np.arange(rows + 1) * kv_len,
                             keywords)
        out, lse = (result[0], result[1]) if isinstance(result, tuple | list) else (result, None)
        out = out.reshape(rows, q_len, hq, ev).swapaxes(1, 2).reshape(*lead, hq, q_len, ev)
        if lse is not None:  # (Hq, N * L) -> (*B, Hq, L)
            lse = lse.reshape(hq, rows, q_len).swapaxes(0, 1).reshape(*lead, hq, q_len)
        if rank2:
            out, lse = out[0], None if lse is None else lse[0]
        return (out, None, lse) if "return_lse" in keywords else out

    dense.__name__ = getattr(fn, "__name__", "varlen_kernel")
    return dense


# ---- declared conventions (check(..., interface="varlen", empty_lse=, lse_layout=, causal_alignment=)) ----

#: lse of a row with no key to attend: SPEC.md's -inf, or FlashAttention 2's +inf.
EMPTY_LSE_CONVENTIONS = ("-inf", "+inf")
#: lse's layout: SPEC.md's packed ``(Hq, total_q)``, or padded ``(B, Hq, max_seqlen_q)`` (FlashAttention 2's
#: varlen forward before 2.4, and its padded kernels).
LSE_LAYOUTS = ("packed", "padded")
#: Causal and window alignment: None (the kernel takes ``alignment``, with the ``bottom_right`` feature), or
#: "bottom_right" (it takes no alignment keyword and always aligns bottom-right, as FlashAttention >= 2.1).
CAUSAL_ALIGNMENTS = (None, "bottom_right")

#: The evidence line of each declared varlen convention, as reports print it (with the number of rows).
CONVENTION_EVIDENCE = {
    "+inf": "rows with no key to attend: lse is +inf (declared empty_lse='+inf', FlashAttention 2; verified on "
            "every such row, then compared as SPEC.md's -inf)",
    "padded": "lse returned padded (B, Hq, max_seqlen_q) (declared lse_layout='padded'; shape verified, converted "
              "to (Hq, total_q); tokens in no segment have no lse there: theirs is not compared)",
    "bottom_right": "causal and window always bottom-right (declared causal_alignment='bottom_right', no alignment "
                    "keyword): top-left cases run as an equal bottom-right problem (each segment's tokens reversed "
                    "with the window as (right, left); without the window feature, queries padded to S or split)",
}


def packed_lse(padded: np.ndarray, cu_seqlens_q: np.ndarray, total_q: int) -> np.ndarray:
    """``(Hq, total_q)`` from a padded lse ``(B, Hq, max_seqlen_q)``: token ``cu[b] + i`` is
    ``padded[b, :, i]``; tokens in no segment get -inf. AssertionError (a FAIL: the kernel broke its
    declared layout) when the shape is not ``(B, Hq, max_seqlen_q)``."""
    lengths = np.diff(cu_seqlens_q)
    batch, longest = lengths.size, int(lengths.max(initial=0))
    assert padded.ndim == 3 and padded.shape[0] == batch and padded.shape[2] >= longest, (
        f"lse: shape {padded.shape}, expected (B, Hq, max_seqlen_q) = ({batch}, Hq, {longest}) (declared "
        f"lse_layout='padded')")
    lse = np.full((padded.shape[1], total_q), -np.inf, dtype=padded.dtype)
    for b in range(batch):
        start = int(cu_seqlens_q[b])
        lse[:, start:start + int(lengths[b])] = padded[b, :, :int(lengths[b])]
    return lse


@dataclass(frozen=True)
class BottomRightCall:
    """One kernel call of a top-left problem run bottom-right: the query and key tokens it takes (indices
    into the original packed q and k), its segmentation, the keywords it changes, and where each of its
    query rows goes (-1: a padding query whose result is dropped)."""

    q_index: np.ndarray
    cu_seqlens_q: np.ndarray
    k_index: np.ndarray
    cu_seqlens_k: np.ndarray
    keywords: dict[str, Any]
    rows: np.ndarray


def _reversed_segments(cu: np.ndarray, total: int) -> np.ndarray:
    """Token indices with each segment's tokens in reverse order (tokens in no segment in place)."""
    parts = [np.arange(int(cu[b + 1]) - 1, int(cu[b]) - 1, -1) for b in range(cu.size - 1)]
    return np.concatenate([*parts, np.arange(int(cu[-1]), total)]).astype(np.int64)


def bottom_right_calls(cu_q: np.ndarray, cu_k: np.ndarray, total_q: int, total_k: int, causal: bool,
                       window: tuple[int | None, int | None] | None, has_window: bool) -> list[BottomRightCall]:
    """The bottom-right calls that compute a top-left causal/window problem exactly (each original query
    row in exactly one call). With the window feature: one call, each segment's queries and keys
    reversed, window ``(l, r)`` as ``(r, l)`` and causal as a left side of 0. Without it (causal alone):
    each segment's first ``min(L_b, S_b)`` queries padded to ``S_b`` with copies of its first query
    (offsets 0 either way), and its queries beyond ``S_b``, which see every key, in a second call
    without causal."""
    keys = np.arange(total_k, dtype=np.int64)
    if has_window:
        left, right = (None, None) if window is None else window
        return [BottomRightCall(_reversed_segments(cu_q, total_q), cu_q, _reversed_segments(cu_k, total_k), cu_k,
                                {"causal": False, "window": (0 if causal else right, left)},
                                _reversed_segments(cu_q, total_q))]
    lengths_q, lengths_k = np.diff(cu_q), np.diff(cu_k)
    first, first_rows, first_lengths, rest, rest_lengths = [], [], [], [], []
    for b in range(lengths_q.size):
        start, length, held = int(cu_q[b]), int(lengths_q[b]), int(lengths_k[b])
        kept = min(length, held)
        pad = held - kept if kept else 0
        first.append(np.concatenate([start + np.arange(kept), np.full(pad, start)]))
        first_rows.append(np.concatenate([start + np.arange(kept), np.full(pad, -1)]))
        first_lengths.append(kept + pad)
        rest.append(start + np.arange(kept, length))
        rest_lengths.append(length - kept)
    outside = np.arange(int(cu_q[-1]), total_q)
    calls = [BottomRightCall(np.concatenate([*first, outside]).astype(np.int64), _cumulative(first_lengths), keys,
                             cu_k, {}, np.concatenate([*first_rows, outside]).astype(np.int64))]
    if sum(rest_lengths):
        index = np.concatenate(rest).astype(np.int64)
        calls.append(BottomRightCall(index, _cumulative(rest_lengths), keys, cu_k, {"causal": False}, index))
    return calls


def _cumulative(lengths: list[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
