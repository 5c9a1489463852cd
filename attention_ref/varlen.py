"""Packed variable-length batches (SPEC.md rule 20): FlashAttention's ``cu_seqlens`` layout, its
block-diagonal mask, and conversions to and from padded batches and segment ids.

Segment b of a packed batch holds tokens ``cu_seqlens[b] : cu_seqlens[b + 1]`` of the token axis
(axis 0); ``cu_seqlens`` is ``(B + 1,)`` integers, starting at 0 and nondecreasing (a zero-length
segment has ``cu_seqlens[b] == cu_seqlens[b + 1]``); tokens at or after ``cu_seqlens[-1]`` are in no
segment. These helpers take and return NumPy arrays (``cu_seqlens`` given as any integer sequence).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .plan import key_range

__all__ = ["cu_seqlens_to_segment_ids", "pack", "segment_ids_to_cu_seqlens", "segment_lengths", "unpack",
           "varlen_mask"]


def checked_cu_seqlens(cu_seqlens: Any, total: int | None = None, *, name: str = "cu_seqlens") -> np.ndarray:
    """``cu_seqlens`` as an int64 NumPy array, or ValueError (naming ``name`` and the first bad
    segment) unless it is 1-D with at least one entry, integer, starting at 0, nondecreasing and (with
    ``total``) at most ``total``."""
    array = np.asarray(cu_seqlens)
    if array.ndim != 1 or array.size < 1:
        raise ValueError(f"{name} must be 1-D with B + 1 >= 1 entries, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got {array.dtype}")
    array = array.astype(np.int64)
    if array[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {int(array[0])}")
    drops = np.flatnonzero(np.diff(array) < 0)
    if drops.size:
        b = int(drops[0])
        raise ValueError(f"{name} must be nondecreasing: segment {b} ends at {int(array[b + 1])} before it starts "
                         f"at {int(array[b])}")
    if total is not None and array[-1] > total:
        raise ValueError(f"{name}[-1] = {int(array[-1])} is beyond the {total} packed tokens")
    return array


def segment_lengths(cu_seqlens: Any) -> np.ndarray:
    """``(B,)``: each segment's number of tokens."""
    return np.diff(checked_cu_seqlens(cu_seqlens))


def segment_ids_to_cu_seqlens(segment_ids: Any) -> np.ndarray:
    """The ``cu_seqlens`` of a packed token axis labelled by ``segment_ids`` ``(total,)``: segment b's
    tokens are those labelled b, which must be contiguous and in increasing order of b (labels may skip
    values: a missing label is a zero-length segment). A label of -1 marks padding, allowed only after
    every segment."""
    ids = np.asarray(segment_ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"segment_ids must be 1-D integers, got shape {ids.shape} and dtype {ids.dtype}")
    real = ids[ids >= 0]
    padding = np.flatnonzero(ids < 0)
    if padding.size and padding[0] != real.size:
        raise ValueError("segment_ids: padding (-1) must come after every segment")
    if real.size and np.any(np.diff(real) < 0):
        raise ValueError("segment_ids must be nondecreasing (each segment contiguous, in order)")
    count = int(real.max()) + 1 if real.size else 0
    return np.concatenate([[0], np.cumsum(np.bincount(real, minlength=count))]).astype(np.int64)


def cu_seqlens_to_segment_ids(cu_seqlens: Any, total: int | None = None) -> np.ndarray:
    """``(total,)`` int64: each token's segment, -1 for tokens in no segment (``total`` defaults to
    ``cu_seqlens[-1]``)."""
    cu = checked_cu_seqlens(cu_seqlens, total)
    total = int(cu[-1]) if total is None else total
    ids = np.full(total, -1, dtype=np.int64)
    ids[: cu[-1]] = np.repeat(np.arange(cu.size - 1), np.diff(cu))
    return ids


def pack(x: Any, lengths: Sequence[int] | np.ndarray, *, padding_side: str = "right") -> tuple[np.ndarray, np.ndarray]:
    """A padded batch ``x`` ``(B, T, ...)`` as ``(packed, cu_seqlens)``: ``packed`` ``(sum(lengths),
    ...)`` holds each sequence's ``lengths[b]`` real tokens, in order; ``padding_side`` "right" (the
    real tokens first) or "left" (the real tokens last)."""
    x = np.asarray(x)
    counts = _lengths(lengths, x.shape[0] if x.ndim else -1, x.shape[1] if x.ndim >= 2 else 0)
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    steps = x.shape[1]
    rows = [x[b, :n] if padding_side == "right" else x[b, steps - n:] for b, n in enumerate(counts)]
    packed = np.concatenate(rows, axis=0) if rows else np.zeros((0, *x.shape[2:]), x.dtype)
    return packed, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def unpack(packed: Any, cu_seqlens: Any, *, length: int | None = None, padding_side: str = "right",
           fill: Any = 0) -> np.ndarray:
    """The inverse of ``pack``: ``(B, length, ...)`` (``length`` defaults to the longest segment) with
    each segment's tokens on ``padding_side``'s other side and ``fill`` elsewhere."""
    packed = np.asarray(packed)
    cu = checked_cu_seqlens(cu_seqlens, packed.shape[0])
    counts = np.diff(cu)
    length = int(counts.max(initial=0)) if length is None else length
    if counts.size and counts.max() > length:
        raise ValueError(f"segment {int(np.argmax(counts))} has {int(counts.max())} tokens, more than length={length}")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    out = np.full((counts.size, length, *packed.shape[1:]), fill, dtype=packed.dtype)
    for b, (start, stop) in enumerate(zip(cu[:-1], cu[1:], strict=True)):
        n = stop - start
        if padding_side == "right":
            out[b, :n] = packed[start:stop]
        else:
            out[b, length - n:] = packed[start:stop]
    return out


def varlen_mask(cu_seqlens_q: Any, cu_seqlens_k: Any, *, total_q: int | None = None, total_k: int | None = None,
                causal: bool = False, alignment: str = "top_left", window: tuple[int | None, int | None] | None = None,
                seqused_k: Any = None) -> np.ndarray:
    """Bool ``(total_q, total_k)``: query token t may attend key token u iff both are in the same
    segment b, u is among the first ``seqused_k[b]`` keys of it (all when None), and causal and the
    window (rule 7) allow them at their positions within the segment, aligned per segment:
    ``offset = 0`` (top_left) or ``S_b - L_b`` (bottom_right), with ``S_b`` the keys used. Tokens in
    no segment attend nothing and are attended by nothing. ``total_q``/``total_k`` default to
    ``cu_seqlens[-1]``. Checks as ``varlen_attention`` does (ValueError naming the segment)."""
    cu_q, cu_k = checked_cu_seqlens(cu_seqlens_q, total_q, name="cu_seqlens_q"), checked_cu_seqlens(
        cu_seqlens_k, total_k, name="cu_seqlens_k")
    if cu_q.size != cu_k.size:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length (B + 1), got {cu_q.size} and "
                         f"{cu_k.size}")
    used = used_keys(cu_k, seqused_k)
    total_q = int(cu_q[-1]) if total_q is None else total_q
    total_k = int(cu_k[-1]) if total_k is None else total_k
    mask = np.zeros((total_q, total_k), dtype=bool)
    for b in range(cu_q.size - 1):
        q_len, kv_len = int(cu_q[b + 1] - cu_q[b]), int(used[b])
        low, high = key_range(q_len, kv_len, causal=causal, alignment=alignment, window=window)
        key_minus_query = np.arange(kv_len) - np.arange(q_len)[:, None]
        block = np.ones((q_len, kv_len), dtype=bool)
        if low is not None:
            block &= key_minus_query >= low
        if high is not None:
            block &= key_minus_query <= high
        mask[cu_q[b]:cu_q[b + 1], cu_k[b]:cu_k[b] + kv_len] = block
    return mask


def used_keys(cu_seqlens_k: np.ndarray, seqused_k: Any) -> np.ndarray:
    """``(B,)``: the keys each segment uses, its length or ``seqused_k[b]`` (ValueError naming the
    segment when ``seqused_k`` is not ``(B,)`` integers within ``[0, length]``)."""
    lengths = np.diff(cu_seqlens_k)
    if seqused_k is None:
        return lengths
    used = np.asarray(seqused_k)
    if used.shape != lengths.shape or not np.issubdtype(used.dtype, np.integer):
        raise ValueError(f"seqused_k must be {lengths.shape} integers, got shape {used.shape} and dtype {used.dtype}")
    bad = np.flatnonzero((used < 0) | (used > lengths))
    if bad.size:
        b = int(bad[0])
        raise ValueError(f"seqused_k[{b}] = {int(used[b])} is outside [0, {int(lengths[b])}], the keys of segment {b}")
    return used.astype(np.int64)


def _lengths(lengths: Sequence[int] | np.ndarray, batch: int, steps: int) -> np.ndarray:
    counts = np.asarray(lengths)
    if counts.shape != (batch,) or not np.issubdtype(counts.dtype, np.integer):
        raise ValueError(f"lengths must be ({batch},) integers, got shape {counts.shape}")
    bad = np.flatnonzero((counts < 0) | (counts > steps))
    if bad.size:
        raise ValueError(f"lengths[{int(bad[0])}] = {int(counts[bad[0]])} is outside [0, {steps}]")
    return counts.astype(np.int64)


def packed_problem(q: Any, k: Any, v: Any, cu_seqlens_q: Any, cu_seqlens_k: Any, seqused_k: Any,
                   to_numpy: Any, *, causal: bool, alignment: str,
                   window: tuple[int | None, int | None] | None) -> np.ndarray:
    """The checks of ``varlen_attention`` (rule 20; ValueError) and its mask: q ``(total_q, Hq, E)``,
    k ``(total_k, Hkv, E)``, v ``(total_k, Hkv, Ev)``; ``cu_seqlens_q``/``cu_seqlens_k`` and
    ``seqused_k`` as NumPy or framework arrays (``to_numpy`` converts them: they must be concrete,
    not traced). Returns ``varlen_mask`` ``(total_q, total_k)``."""
    from .validation import _check_flag, _check_window

    _check_flag("causal", causal)
    if alignment not in ("top_left", "bottom_right"):
        raise ValueError(f"alignment must be 'top_left' or 'bottom_right', got {alignment!r}")
    window = None if window is None else _check_window(window)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if len(getattr(x, "shape", ())) != 3:
            raise ValueError(f"varlen_attention: {name} must be (total, heads, head_dim), got shape "
                             f"{tuple(getattr(x, 'shape', ()))}")
    if tuple(k.shape[:2]) != tuple(v.shape[:2]):
        raise ValueError(f"varlen_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same tokens and "
                         "heads")

    cu_q, cu_k = (concrete_integers(x, name, to_numpy) for x, name in ((cu_seqlens_q, "cu_seqlens_q"),
                                                                        (cu_seqlens_k, "cu_seqlens_k")))
    return varlen_mask(cu_q, cu_k, total_q=int(q.shape[0]), total_k=int(k.shape[0]), causal=causal,
                       alignment=alignment, window=window,
                       seqused_k=None if seqused_k is None else concrete_integers(seqused_k, "seqused_k", to_numpy))


def concrete_integers(x: Any, name: str, to_numpy: Any, caller: str = "varlen_attention") -> np.ndarray:
    """``x`` (NumPy, a list or tuple, or a framework array converted by ``to_numpy``) as a NumPy
    array; ValueError naming ``caller`` and ``name`` when it has no values (a value traced by
    ``jax.jit``: the segmentation or the table decides what is computed, so it must be known)."""
    if isinstance(x, np.ndarray | list | tuple):
        return np.asarray(x)
    try:
        return np.asarray(to_numpy(x))
    except Exception as error:  # a traced value (inside jax.jit), say
        raise ValueError(f"{caller}: {name} must be concrete integers (NumPy, a list or a framework array with "
                         f"values), got {type(x).__name__}: {error}") from None
