"""Hypothesis strategies for paged KV-cache cases (SPEC.md rule 21).

A :class:`PagedCase` holds the inputs of one ``paged_attention`` call (NumPy, the input dtype) and
derives what the spec says of it: each sequence as an ordinary bottom-right
:class:`~attention_ref.testing.cases.AttentionCase` on its gathered logical cache (heads first), the
query tokens in no sequence, and the same problem with its pages placed elsewhere.
``paged_cases(features)`` draws them: 1 to 4 sequences, page sizes 1 to 4, cache lengths 0 to 10 (not
page multiples, zero-length caches), pages placed in a random order, sometimes one page in two rows
(aliased), table entries past the used blocks holding -1, stale page numbers or numbers outside the
cache, decode (q ``(B, Hq, E)``) or chunked prefill (q packed with ``cu_seqlens_q``, 0 to 4 queries a
sequence, sometimes more than cached tokens, tokens after ``cu_seqlens_q[-1]``), GQA, E != Ev, causal,
windows, softcap and scale, within the features of the implementation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from hypothesis import strategies as st

from ..frameworks import numpy_dtype
from ..paged import logical_cache_index
from .cases import AttentionCase
from .strategies import DISTRIBUTIONS, QK_MAGNITUDES, Features, random_values

#: Largest case (elements of q and the caches) whose arrays are printed in full.
_REPR_FULL_LIMIT = 256
#: Most sequences, cached tokens a sequence, queries a sequence (chunked prefill) and spare pages drawn.
MAX_SEQUENCES, MAX_CACHE_LEN, MAX_CHUNK, MAX_SPARE_PAGES = 4, 10, 4, 2


@dataclass(frozen=True, eq=False)
class PagedCase:
    """One paged call: q ``(B, Hq, E)`` (decode, ``cu_seqlens_q`` None) or ``(total_q, Hq, E)``,
    k_cache ``(N, P, Hkv, E)``, v_cache ``(N, P, Hkv, Ev)``, ``block_table`` ``(B, M)`` and
    ``cache_seqlens`` ``(B,)`` int64, ``cu_seqlens_q`` ``(B + 1,)`` int64 or None, and the scalar
    keywords of rule 21. Compares and hashes by identity."""

    q: np.ndarray
    k_cache: np.ndarray
    v_cache: np.ndarray
    block_table: np.ndarray
    cache_seqlens: np.ndarray
    cu_seqlens_q: np.ndarray | None = None
    scale: float | None = None
    causal: bool = False
    softcap: float | None = None
    window: tuple[int | None, int | None] | None = None

    __eq__ = object.__eq__
    __hash__ = object.__hash__

    @property
    def dtype(self) -> str:
        return self.q.dtype.name

    @property
    def page_size(self) -> int:
        return int(self.k_cache.shape[1])

    @property
    def num_sequences(self) -> int:
        return int(self.cache_seqlens.size)

    def keywords(self) -> dict[str, Any]:
        """The keywords of ``paged_attention`` besides the arrays (``cu_seqlens_q`` only when set)."""
        keywords: dict[str, Any] = dict(scale=self.scale, causal=self.causal, softcap=self.softcap,
                                        window=self.window)
        if self.cu_seqlens_q is not None:
            keywords["cu_seqlens_q"] = self.cu_seqlens_q
        return keywords

    def cu_q(self) -> np.ndarray:
        """``(B + 1,)``: the query segmentation (decode: ``arange(B + 1)``)."""
        return np.arange(self.num_sequences + 1) if self.cu_seqlens_q is None else self.cu_seqlens_q

    def query_rows(self, b: int) -> slice:
        cu = self.cu_q()
        return slice(int(cu[b]), int(cu[b + 1]))

    def outside_queries(self) -> slice:
        """Query tokens in no sequence (at or after ``cu_seqlens_q[-1]``)."""
        return slice(int(self.cu_q()[-1]), self.q.shape[0])

    def used_blocks(self, b: int) -> int:
        """The table entries sequence b reads: ``ceil(cache_seqlens[b] / page_size)``."""
        return -(-int(self.cache_seqlens[b]) // self.page_size)

    def logical(self, cache: np.ndarray, b: int) -> np.ndarray:
        """Sequence b's logical cache ``(cache_seqlens[b], Hkv, ...)`` gathered from ``cache``."""
        index = logical_cache_index(self.block_table[b:b + 1], self.cache_seqlens[b:b + 1], self.page_size)
        return cache.reshape(-1, *cache.shape[2:])[index]

    def sequence(self, b: int) -> AttentionCase:
        """Sequence b as an ordinary attention case, heads first: its queries against its gathered
        logical cache, causal and the window bottom-right aligned."""
        rows = self.query_rows(b)
        return AttentionCase(q=self.q[rows].swapaxes(0, 1), k=self.logical(self.k_cache, b).swapaxes(0, 1),
                             v=self.logical(self.v_cache, b).swapaxes(0, 1), scale=self.scale, causal=self.causal,
                             alignment="bottom_right", softcap=self.softcap, window=self.window)

    def read_slots(self) -> np.ndarray:
        """``(N, P)`` bool: the cache slots some sequence reads."""
        read = np.zeros(self.k_cache.shape[0] * self.page_size, dtype=bool)
        read[logical_cache_index(self.block_table, self.cache_seqlens, self.page_size)] = True
        return read.reshape(self.k_cache.shape[:2])

    def moved(self, rng: np.random.Generator) -> PagedCase:
        """The same problem with its pages placed elsewhere: the cache's pages permuted and the table
        remapped, the table entries past the used blocks and the slots no sequence reads redrawn."""
        blocks = self.k_cache.shape[0]
        permutation = rng.permutation(blocks)  # page p moves to permutation[p]
        k_cache, v_cache = np.empty_like(self.k_cache), np.empty_like(self.v_cache)
        k_cache[permutation], v_cache[permutation] = self.k_cache, self.v_cache
        unread = ~self.read_slots()[np.argsort(permutation)]
        dtype = numpy_dtype(self.dtype)
        for cache in (k_cache, v_cache):
            cache[unread] = random_values(rng, cache[unread].shape, "normal", 3.0).astype(dtype)
        table = self.block_table.copy()
        for b in range(self.num_sequences):
            used = self.used_blocks(b)
            table[b, :used] = permutation[table[b, :used]]
            table[b, used:] = rng.choice(np.array([-1, blocks, *range(blocks)]), size=table.shape[1] - used)
        return PagedCase(self.q, k_cache, v_cache, table, self.cache_seqlens, self.cu_seqlens_q, self.scale,
                         self.causal, self.softcap, self.window)

    def _small(self) -> bool:
        return self.q.size + self.k_cache.size + self.v_cache.size <= _REPR_FULL_LIMIT

    def record(self) -> dict[str, Any]:
        """The case as plain values (``report.case_record``): ``kind`` "paged", ``dtype``, ``shapes``,
        ``options`` (the scalar keywords, window as a list), ``block_table``, ``cache_seqlens``,
        ``cu_seqlens_q`` as lists (None for decode), ``arrays`` (q and the caches as float64 nested
        lists when small, else None) and ``repr``."""
        options = {key: list(value) if isinstance(value, tuple) else value
                   for key, value in self.keywords().items() if key != "cu_seqlens_q"}
        named = {"q": self.q, "k_cache": self.k_cache, "v_cache": self.v_cache}
        return {
            "kind": "paged",
            "dtype": self.dtype,
            "shapes": {name: list(x.shape) for name, x in named.items()},
            "options": options,
            "block_table": self.block_table.tolist(),
            "cache_seqlens": self.cache_seqlens.tolist(),
            "cu_seqlens_q": None if self.cu_seqlens_q is None else self.cu_seqlens_q.tolist(),
            "arrays": {name: np.asarray(x, np.float64).tolist() for name, x in named.items()} if self._small()
            else None,
            "repr": repr(self),
        }

    def __repr__(self) -> str:
        def show(x: np.ndarray) -> str:
            if self._small():
                body = np.array2string(np.asarray(x, np.float64), separator=", ", threshold=10**6,
                                       max_line_width=10**6)
                return f"np.array({body}, dtype={x.dtype.name!r})"
            return f"<{x.dtype.name} array {x.shape}>"

        options = ", ".join(f"{key}={value!r}" for key, value in self.keywords().items() if key != "cu_seqlens_q")
        cu = "" if self.cu_seqlens_q is None else f"cu_seqlens_q={self.cu_seqlens_q.tolist()!r}, "
        return (f"PagedCase(q={show(self.q)}, k_cache={show(self.k_cache)}, v_cache={show(self.v_cache)}, "
                f"block_table={self.block_table.tolist()!r}, cache_seqlens={self.cache_seqlens.tolist()!r}, {cu}"
                f"{options})  # q {self.q.shape}, k_cache {self.k_cache.shape}, v_cache {self.v_cache.shape}, "
                f"{self.dtype}")


@st.composite
def paged_cases(draw: Any, features: Features) -> PagedCase:
    """Draw a ``PagedCase`` within ``features`` (GQA, E != Ev, scale, causal, softcap and window only
    when supported; dtypes from ``features.dtypes``)."""
    dtype = draw(st.sampled_from(features.dtypes))
    batch = draw(st.integers(1, MAX_SEQUENCES))
    page = draw(st.integers(1, 4))
    lengths = draw(st.lists(st.integers(0, MAX_CACHE_LEN), min_size=batch, max_size=batch))
    used = [-(-n // page) for n in lengths]
    max_blocks = max(used) + draw(st.integers(0, 2))
    blocks = sum(used) + draw(st.integers(0, MAX_SPARE_PAGES))
    alias = batch > 1 and draw(st.integers(0, 2)) == 0  # one page in two rows: a shared prefix
    chunked = draw(st.booleans())
    lengths_q = draw(st.lists(st.integers(0, MAX_CHUNK), min_size=batch, max_size=batch)) if chunked else [1] * batch
    extra_q = draw(st.integers(0, 1)) if chunked else 0
    hkv = draw(st.integers(1, 2))
    group = draw(st.integers(1, 3)) if "gqa" in features else 1
    head_dim = draw(st.integers(1, 5))
    value_dim = draw(st.integers(1, 5)) if "value_dim" in features else head_dim

    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    order = rng.permutation(max(blocks, 1))  # the pages, placed at random
    table = np.full((batch, max_blocks), -1, dtype=np.int64)
    start = 0
    for b in range(batch):
        table[b, :used[b]] = order[start:start + used[b]]
        start += used[b]
        stale = rng.choice(np.array([-1, blocks, blocks + 7, *range(blocks)]), size=max_blocks - used[b])
        table[b, used[b]:] = stale  # entries no sequence reads: padding, stale pages, numbers outside the cache
    if alias:
        readers = [b for b in range(batch) if used[b]]
        if len(readers) >= 2:
            a, b = rng.choice(readers, size=2, replace=False)
            table[b, 0] = table[a, 0]
    qk_distribution, v_distribution = draw(st.sampled_from(DISTRIBUTIONS)), draw(st.sampled_from(DISTRIBUTIONS))
    qk_magnitude = draw(st.sampled_from(QK_MAGNITUDES))
    np_dtype = numpy_dtype(dtype)
    q = random_values(rng, (sum(lengths_q) + extra_q, hkv * group, head_dim), qk_distribution,
                      qk_magnitude).astype(np_dtype)
    k_cache = random_values(rng, (blocks, page, hkv, head_dim), qk_distribution, qk_magnitude).astype(np_dtype)
    v_cache = random_values(rng, (blocks, page, hkv, value_dim), v_distribution, 1.0).astype(np_dtype)

    scale = None
    if "scale" in features and draw(st.booleans()):
        scale = draw(st.sampled_from((0.0, -1.0, 1e-3, 0.125, 2.0)))
    causal = "causal" in features and draw(st.booleans())
    softcap = draw(st.sampled_from((0.5, 1.0, 5.0, 30.0))) if "softcap" in features and draw(st.booleans()) else None
    window = None
    if "window" in features and draw(st.booleans()):
        sides = st.one_of(st.none(), st.integers(0, MAX_CACHE_LEN + 1))
        window = (draw(sides), draw(sides))
    cu_q = np.concatenate([[0], np.cumsum(lengths_q)]).astype(np.int64) if chunked else None
    return PagedCase(q, k_cache, v_cache, table, np.asarray(lengths, np.int64), cu_q, scale, causal, softcap, window)
