"""A NumPy kernel with a paged KV-cache interface, written as people write it (a loop over the
sequences, gathering each one's pages through the block table), and planted bugs of that interface.

``paged_kernel(**bugs)`` returns ``attention(q, k_cache, v_cache, block_table, cache_seqlens, *,
cu_seqlens_q=None, max_seqlen_q, scale=None, causal=False, softcap=None, window=None,
return_lse=False)``: q ``(B, Hq, E)`` (decode) or ``(total_q, Hq, E)`` with ``cu_seqlens_q``, the
caches ``(N, P, Hkv, E|Ev)``, out in q's layout, lse ``(Hq, total_q)``; causal and the window
bottom-right. The bugs that read pages or slots the correct kernel does not read do so with
``mode="wrap"``, as a GPU kernel reads whatever memory is there instead of raising.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: Every planted bug: its switch, what it does, and the property that must catch it.
PAGED_BUGS: dict[str, tuple[str, str]] = {
    "page_size_wrong": ("the page size inferred from the table as ceil(max(cache_seqlens) / max_blocks), not "
                        "k_cache.shape[1]", "paged_equals_dense_on_gathered_cache"),
    "cache_seqlens_exclusive": ("cache_seqlens taken as the index of the last token: one token too many read",
                                "paged_equals_dense_on_gathered_cache"),
    "causal_top_left": ("chunked prefill's causal and window aligned top-left (offset 0, not cache_seqlens - L)",
                        "paged_equals_dense_on_gathered_cache"),
    "stale_table_entries_read": ("a sequence's pages taken as every entry of its row inside the cache (trusting -1 "
                                 "padding), not the first ceil(cache_seqlens / page_size)",
                                 "paged_equals_dense_on_gathered_cache"),
    "last_page_read_whole": ("every slot of the last page attended (cache_seqlens rounded up to a page multiple)",
                             "paged_equals_dense_on_gathered_cache"),
    "physical_page_order": ("a sequence's pages read in the order of their page numbers (sorted, to coalesce "
                            "reads), not the table's", "paged_is_invariant_to_page_permutation"),
}


@dataclass(frozen=True)
class PagedBug:
    name: str
    description: str
    catches: str


PAGED_BUG_LIST = tuple(PagedBug(name, *what) for name, what in PAGED_BUGS.items())

#: The features of the paged kernel.
PAGED_FEATURES = ("scale", "causal", "softcap", "window", "gqa", "value_dim", "lse")


def paged_kernel(**bugs: bool) -> Any:
    """The correct paged kernel, or with the named bugs planted."""
    unknown = set(bugs) - set(PAGED_BUGS)
    assert not unknown, unknown
    bug = {name: bugs.get(name, False) for name in PAGED_BUGS}

    def logical_cache(cache: np.ndarray, row: np.ndarray, length: int, max_len: int) -> np.ndarray:
        """The sequence's first ``length`` tokens ``(length, Hkv, W)``, read through its table ``row``."""
        blocks, page = cache.shape[:2]
        if bug["page_size_wrong"]:
            page = max(1, -(-max_len // row.size)) if row.size else page
        if bug["cache_seqlens_exclusive"]:
            length += 1
        used = -(-length // page)
        pages = row[:used]
        if bug["stale_table_entries_read"]:
            pages = row[(row >= 0) & (row < blocks)]
            length = max(0, length + (pages.size - used) * page)
        if bug["physical_page_order"]:
            pages = np.sort(pages)
        if bug["last_page_read_whole"]:
            length = pages.size * page
        if bug["page_size_wrong"]:  # token j at slot j % page of table entry j // page
            j = np.arange(length)
            flat = np.take(pages, j // page, mode="wrap") * cache.shape[1] + j % page
            return np.take(cache.reshape(-1, *cache.shape[2:]), flat, axis=0, mode="wrap")
        gathered = np.take(cache, pages, axis=0, mode="wrap").reshape(-1, *cache.shape[2:])
        if gathered.shape[0] < length:  # read past the table: whatever pages come next
            more = np.take(cache, np.arange(length - gathered.shape[0]) // cache.shape[1], axis=0, mode="wrap")
            gathered = np.concatenate([gathered, more.reshape(-1, *cache.shape[2:])])[:length]
        return gathered[:length]

    def attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, block_table: np.ndarray,
                  cache_seqlens: np.ndarray, *, cu_seqlens_q: np.ndarray | None = None, max_seqlen_q: int,
                  scale: float | None = None, causal: bool = False, softcap: float | None = None,
                  window: tuple[int | None, int | None] | None = None, return_lse: bool = False) -> Any:
        table, lengths = np.asarray(block_table).astype(int), np.asarray(cache_seqlens).astype(int)
        batch = lengths.size
        cu_q = np.arange(batch + 1) if cu_seqlens_q is None else np.asarray(cu_seqlens_q).astype(int)
        total_q, hq, e = q.shape
        hkv, ev = k_cache.shape[2], v_cache.shape[3]
        scale = 1 / np.sqrt(e) if scale is None else scale
        out = np.zeros((total_q, hq, ev))
        lse = np.full((hq, total_q), -np.inf)
        max_len = int(lengths.max(initial=0))
        for b in range(batch):
            q0, q1 = cu_q[b], cu_q[b + 1]
            if q1 == q0:
                continue
            ks = logical_cache(k_cache, table[b], int(lengths[b]), max_len)
            vs = logical_cache(v_cache, table[b], int(lengths[b]), max_len)
            qs = q[q0:q1].astype(np.float64).swapaxes(0, 1)  # (Hq, L, E)
            ks = np.repeat(ks.astype(np.float64).swapaxes(0, 1), hq // hkv, axis=0)
            vs = np.repeat(vs.astype(np.float64).swapaxes(0, 1), hq // hkv, axis=0)
            logits = qs @ ks.swapaxes(-1, -2) * scale
            if softcap is not None:
                logits = softcap * np.tanh(logits / softcap)
            length, keys = q1 - q0, ks.shape[1]
            rows, cols = np.arange(length)[:, None], np.arange(keys)[None, :]
            offset = 0 if bug["causal_top_left"] and cu_seqlens_q is not None else int(lengths[b]) - length
            allowed = np.ones((length, keys), dtype=bool)
            if causal:
                allowed &= cols <= rows + offset
            if window is not None:
                left, right = window
                if left is not None:
                    allowed &= cols >= rows + offset - left
                if right is not None:
                    allowed &= cols <= rows + offset + right
            logits = np.where(allowed, logits, -np.inf)
            top = logits.max(axis=-1, keepdims=True, initial=-np.inf)
            weights = np.exp(logits - np.where(np.isfinite(top), top, 0))
            total = weights.sum(axis=-1, keepdims=True)
            out[q0:q1] = (weights / np.where(total == 0, 1, total) @ vs).swapaxes(0, 1)
            with np.errstate(divide="ignore"):
                sequence_lse = (np.where(np.isfinite(top), top, 0) + np.log(total))[..., 0]
            lse[:, q0:q1] = np.where(total[..., 0] == 0, -np.inf, sequence_lse)
        out = out.astype(q.dtype)
        return (out, lse) if return_lse else out

    return attention
