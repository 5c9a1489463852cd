"""Hypothesis strategies for packed variable-length cases (SPEC.md rule 20).

A :class:`VarlenCase` holds the inputs of one ``varlen_attention`` call in FlashAttention's layout
(NumPy, the input dtype) and derives what the spec says of it: each segment as an ordinary
:class:`~attention_ref.testing.cases.AttentionCase` (heads first), the packed sequence as one
dense case with the block-diagonal ``varlen_mask``, and the tokens in no segment.
``varlen_cases(features)`` draws them: 0 to 4 segments with zero-length ones anywhere, lengths 0 to 6,
sometimes tokens beyond ``cu_seqlens[-1]`` and a ``seqused_k``, GQA, E != Ev, causal at either
alignment, windows, softcap and scale, within the features of the implementation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from hypothesis import strategies as st

from ..frameworks import numpy_dtype
from ..varlen import varlen_mask
from .cases import AttentionCase
from .strategies import DISTRIBUTIONS, QK_MAGNITUDES, Features, random_values

#: Largest case (elements of q, k, v) whose arrays are printed in full.
_REPR_FULL_LIMIT = 256
#: Most segments, tokens per segment, and tokens beyond the last segment drawn.
MAX_SEGMENTS, MAX_SEGMENT_LEN, MAX_EXTRA_TOKENS = 4, 6, 2


@dataclass(frozen=True, eq=False)
class VarlenCase:
    """One packed call: q ``(total_q, Hq, E)``, k ``(total_k, Hkv, E)``, v ``(total_k, Hkv, Ev)``,
    ``cu_seqlens_q``/``cu_seqlens_k`` ``(B + 1,)`` int64, ``seqused_k`` ``(B,)`` int64 or None, and the
    scalar keywords of rule 20. Compares and hashes by identity."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    cu_seqlens_q: np.ndarray
    cu_seqlens_k: np.ndarray
    seqused_k: np.ndarray | None = None
    scale: float | None = None
    causal: bool = False
    alignment: str = "top_left"
    softcap: float | None = None
    window: tuple[int | None, int | None] | None = None

    __eq__ = object.__eq__
    __hash__ = object.__hash__

    @property
    def dtype(self) -> str:
        return self.q.dtype.name

    @property
    def num_segments(self) -> int:
        return int(self.cu_seqlens_q.size - 1)

    def keywords(self) -> dict[str, Any]:
        """The keywords of ``varlen_attention`` besides the arrays (seqused_k only when set)."""
        keywords: dict[str, Any] = dict(scale=self.scale, causal=self.causal, alignment=self.alignment,
                                        softcap=self.softcap, window=self.window)
        if self.seqused_k is not None:
            keywords["seqused_k"] = self.seqused_k
        return keywords

    def used(self) -> np.ndarray:
        """``(B,)``: the keys each segment uses."""
        return np.diff(self.cu_seqlens_k) if self.seqused_k is None else self.seqused_k

    def query_rows(self, b: int) -> slice:
        return slice(int(self.cu_seqlens_q[b]), int(self.cu_seqlens_q[b + 1]))

    def key_rows(self, b: int) -> slice:
        """The keys segment b uses (its first ``seqused_k[b]``)."""
        start = int(self.cu_seqlens_k[b])
        return slice(start, start + int(self.used()[b]))

    def segment(self, b: int) -> AttentionCase:
        """Segment b as an ordinary attention case, heads first: its queries against the keys it uses."""
        rows, keys = self.query_rows(b), self.key_rows(b)
        return AttentionCase(q=self.q[rows].swapaxes(0, 1), k=self.k[keys].swapaxes(0, 1),
                             v=self.v[keys].swapaxes(0, 1), scale=self.scale, causal=self.causal,
                             alignment=self.alignment, softcap=self.softcap, window=self.window)

    def mask(self) -> np.ndarray:
        """``varlen_mask`` ``(total_q, total_k)`` of this case."""
        return varlen_mask(self.cu_seqlens_q, self.cu_seqlens_k, total_q=self.q.shape[0], total_k=self.k.shape[0],
                           causal=self.causal, alignment=self.alignment, window=self.window, seqused_k=self.seqused_k)

    def packed(self) -> AttentionCase:
        """The packed sequence as one dense case (rule 20's definition): heads first, the explicit
        ``varlen_mask`` in place of causal and the window."""
        return AttentionCase(q=self.q.swapaxes(0, 1), k=self.k.swapaxes(0, 1), v=self.v.swapaxes(0, 1),
                             mask=self.mask(), scale=self.scale, softcap=self.softcap)

    def outside_queries(self) -> slice:
        """Query tokens in no segment (at or after ``cu_seqlens_q[-1]``)."""
        return slice(int(self.cu_seqlens_q[-1]), self.q.shape[0])

    def unused_keys(self) -> np.ndarray:
        """``(total_k,)`` bool: keys attended by no query (beyond ``cu_seqlens_k[-1]`` or ``seqused_k``)."""
        unused = np.ones(self.k.shape[0], dtype=bool)
        for b in range(self.num_segments):
            unused[self.key_rows(b)] = False
        return unused

    def replace_segment(self, b: int, rng: np.random.Generator) -> VarlenCase:
        """The case with segment b's q, k and v tokens (b == B: the tokens in no segment) redrawn."""
        if b < self.num_segments:
            rows = self.query_rows(b)
            keys = slice(int(self.cu_seqlens_k[b]), int(self.cu_seqlens_k[b + 1]))
        else:
            rows, keys = self.outside_queries(), slice(int(self.cu_seqlens_k[-1]), self.k.shape[0])
        dtype = numpy_dtype(self.dtype)
        q, k, v = self.q.copy(), self.k.copy(), self.v.copy()
        for x, index in ((q, rows), (k, keys), (v, keys)):
            x[index] = random_values(rng, x[index].shape, "normal", 3.0).astype(dtype)
        return VarlenCase(q, k, v, self.cu_seqlens_q, self.cu_seqlens_k, self.seqused_k, self.scale, self.causal,
                          self.alignment, self.softcap, self.window)

    def _small(self) -> bool:
        return self.q.size + self.k.size + self.v.size <= _REPR_FULL_LIMIT

    def record(self) -> dict[str, Any]:
        """The case as plain values (``report.case_record``): ``kind`` "varlen", ``dtype``, ``shapes``,
        ``options`` (the scalar keywords, window as a list), ``cu_seqlens_q``, ``cu_seqlens_k``,
        ``seqused_k`` as lists, ``arrays`` (q, k, v as float64 nested lists when small, else None) and
        ``repr``."""
        options = {key: list(value) if isinstance(value, tuple) else value
                   for key, value in self.keywords().items() if key != "seqused_k"}
        named = {"q": self.q, "k": self.k, "v": self.v}
        return {
            "kind": "varlen",
            "dtype": self.dtype,
            "shapes": {name: list(x.shape) for name, x in named.items()},
            "options": options,
            "cu_seqlens_q": self.cu_seqlens_q.tolist(),
            "cu_seqlens_k": self.cu_seqlens_k.tolist(),
            "seqused_k": None if self.seqused_k is None else self.seqused_k.tolist(),
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

        options = ", ".join(f"{key}={value!r}" for key, value in self.keywords().items() if key != "seqused_k")
        used = "" if self.seqused_k is None else f", seqused_k={self.seqused_k.tolist()!r}"
        return (f"VarlenCase(q={show(self.q)}, k={show(self.k)}, v={show(self.v)}, "
                f"cu_seqlens_q={self.cu_seqlens_q.tolist()!r}, cu_seqlens_k={self.cu_seqlens_k.tolist()!r}{used}, "
                f"{options})  # q {self.q.shape}, k {self.k.shape}, v {self.v.shape}, {self.dtype}")


def _cu_seqlens(lengths: list[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)


@st.composite
def varlen_cases(draw: Any, features: Features) -> VarlenCase:
    """Draw a ``VarlenCase`` within ``features`` (GQA, E != Ev, scale, causal, bottom_right, softcap
    and window only when supported; dtypes from ``features.dtypes``)."""
    dtype = draw(st.sampled_from(features.dtypes))
    segments = draw(st.integers(0, MAX_SEGMENTS))
    lengths_q = draw(st.lists(st.integers(0, MAX_SEGMENT_LEN), min_size=segments, max_size=segments))
    lengths_k = draw(st.lists(st.integers(0, MAX_SEGMENT_LEN), min_size=segments, max_size=segments))
    extra_q, extra_k = draw(st.integers(0, MAX_EXTRA_TOKENS)), draw(st.integers(0, MAX_EXTRA_TOKENS))
    seqused_k = None
    if segments and draw(st.integers(0, 3)) == 0:
        seqused_k = np.array([draw(st.integers(0, n)) for n in lengths_k], dtype=np.int64)
    hkv = draw(st.integers(1, 2))
    group = draw(st.integers(1, 3)) if "gqa" in features else 1
    head_dim = draw(st.integers(1, 5))
    value_dim = draw(st.integers(1, 5)) if "value_dim" in features else head_dim

    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    qk_distribution, v_distribution = draw(st.sampled_from(DISTRIBUTIONS)), draw(st.sampled_from(DISTRIBUTIONS))
    qk_magnitude = draw(st.sampled_from(QK_MAGNITUDES))
    np_dtype = numpy_dtype(dtype)
    total_q, total_k = sum(lengths_q) + extra_q, sum(lengths_k) + extra_k
    q = random_values(rng, (total_q, hkv * group, head_dim), qk_distribution, qk_magnitude).astype(np_dtype)
    k = random_values(rng, (total_k, hkv, head_dim), qk_distribution, qk_magnitude).astype(np_dtype)
    v = random_values(rng, (total_k, hkv, value_dim), v_distribution, 1.0).astype(np_dtype)

    scale = None
    if "scale" in features and draw(st.booleans()):
        scale = draw(st.sampled_from((0.0, -1.0, 1e-3, 0.125, 2.0)))
    causal = "causal" in features and draw(st.booleans())
    alignment = draw(st.sampled_from(("top_left", "bottom_right") if "bottom_right" in features else ("top_left",)))
    softcap = draw(st.sampled_from((0.5, 1.0, 5.0, 30.0))) if "softcap" in features and draw(st.booleans()) else None
    window = None
    if "window" in features and draw(st.booleans()):
        sides = st.one_of(st.none(), st.integers(0, MAX_SEGMENT_LEN + 1))
        window = (draw(sides), draw(sides))
    return VarlenCase(q, k, v, _cu_seqlens(lengths_q), _cu_seqlens(lengths_k), seqused_k, scale, causal, alignment,
                      softcap, window)
