"""The plan of a validated attention call (``AttentionPlan``) and the options it was made from
(``AttentionOptions``): the one place where the call's shape arithmetic lives.

Shape letters: B... batch dims, Hq query heads, Hkv key/value heads, G = Hq // Hkv query heads per kv
head, L queries, S keys, E q/k head dim, Ev value head dim.

PYTEST_DONT_REWRITE: pytest rewrites the asserts of a plugin's distribution (the ``pytest11``
entry point makes this package one); this module's assertion messages are reported as written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, TypedDict

FLOATING_DTYPES = ("float16", "bfloat16", "float32", "float64")
COMPUTE_DTYPES = ("float32", "float64")
ALIGNMENTS = ("top_left", "bottom_right")


def key_range(q_len: int, kv_len: int, *, causal: bool, alignment: str,
              window: tuple[int | None, int | None] | None) -> tuple[int | None, int | None]:
    """``(low, high)`` of rule 7 for ``q_len`` queries and ``kv_len`` keys: query i may attend key j
    only if ``i + low <= j <= i + high`` (causal and window combined at the alignment's offset, 0 for
    top_left and ``kv_len - q_len`` for bottom_right; None for an unbounded side)."""
    offset = 0 if alignment == "top_left" else kv_len - q_len
    left, right = (None, None) if window is None else window
    low = None if left is None else offset - left
    rights = [r for r in (right, 0 if causal else None) if r is not None]
    high = offset + min(rights) if rights else None
    # j - i lies in [-L, S]: clamping there changes nothing and keeps the bounds small integers.
    low = None if low is None else max(low, -q_len)
    high = None if high is None else min(high, kv_len)
    return low, high


@dataclass(frozen=True, kw_only=True, eq=False)
class AttentionOptions:
    """The attention keywords of SPEC.md, as one frozen value: what the front door validates, what an
    ``AttentionCase`` carries beside its q, k, v, and what the checker passes to a kernel.

    mask (bool, True = may attend), bias and dropout_mask (bool, True = keep) are arrays broadcastable
    to ``(*B, Hq, L, S)``, or None; ``window=(left, right)`` (rule 7); ``dropout_p`` (rule 13);
    ``score_mod(score, b, h, q_idx, kv_idx)`` and ``mask_mod(b, h, q_idx, kv_idx)``, callables or None
    (rule 22).
    """

    mask: Any = None
    bias: Any = None
    scale: float | None = None
    causal: bool = False
    alignment: str = "top_left"
    softcap: float | None = None
    window: tuple[int | None, int | None] | None = None
    dropout_p: float = 0.0
    dropout_mask: Any = None
    score_mod: Any = None
    mask_mod: Any = None

    def as_keywords(self) -> dict[str, Any]:
        """Every option by its keyword name (arrays not copied; only the options, also on a subclass)."""
        return {f.name: getattr(self, f.name) for f in fields(AttentionOptions)}

    def array_keywords(self) -> dict[str, Any]:
        """mask and bias, and dropout_mask when set (None values included for mask and bias)."""
        arrays = {"mask": self.mask, "bias": self.bias}
        if self.dropout_mask is not None:
            arrays["dropout_mask"] = self.dropout_mask
        return arrays

    def scalar_keywords(self) -> dict[str, Any]:
        """The non-array keywords; window, dropout_p, score_mod and mask_mod only when set (an
        implementation without them can still take every case that does not use them)."""
        keywords: dict[str, Any] = dict(scale=self.scale, causal=self.causal, alignment=self.alignment,
                                        softcap=self.softcap)
        if self.window is not None:
            keywords["window"] = self.window
        if self.dropout_p:
            keywords["dropout_p"] = self.dropout_p
        for name in ("score_mod", "mask_mod"):
            if getattr(self, name) is not None:
                keywords[name] = getattr(self, name)
        return keywords


#: The options with no keyword given.
DEFAULT_OPTIONS = AttentionOptions()


class AttentionKeywords(TypedDict, total=False):
    """The fields of ``AttentionOptions`` as keyword arguments, for type checkers
    (``**options: Unpack[AttentionKeywords]`` in the overloads of ``attention``)."""

    mask: Any
    bias: Any
    scale: float | None
    causal: bool
    alignment: str
    softcap: float | None
    window: tuple[int | None, int | None] | None
    dropout_p: float
    dropout_mask: Any
    score_mod: Any
    mask_mod: Any


@dataclass(frozen=True)
class AttentionPlan:
    """A validated attention call, independent of the framework that will run it.

    Rank-2 inputs ``(L, E)`` have ``has_head_axis=False``; they are computed as one head and the
    results carry no head axis.
    """

    framework: str
    batch_shape: tuple[int, ...]
    has_head_axis: bool
    num_q_heads: int
    num_kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    value_dim: int
    dtype: str
    compute_dtype: str
    scale: float
    softcap: float | None
    causal: bool
    alignment: str
    has_mask: bool
    has_bias: bool
    return_weights: bool
    return_lse: bool
    #: ``window=(left, right)``; None for an unbounded side (rule 7).
    window_left: int | None = None
    window_right: int | None = None
    #: Dropout probability and whether a keep-mask was given (rule 13).
    dropout_p: float = 0.0
    has_dropout_mask: bool = False
    #: The blocked algorithm's tile, ``block_q`` queries by ``block_k`` keys (rule 19), each at most
    #: L and S (and at least 1); both None for the dense algorithm.
    block_q: int | None = None
    block_k: int | None = None
    #: The call's ``score_mod`` (rule 22), applied to the scaled logits of the dense algorithm; None
    #: without one. (A ``mask_mod`` is evaluated into the mask before the plan reaches a backend.)
    score_mod: Any = None

    @property
    def blocked(self) -> bool:
        """Whether the call runs the blocked algorithm (rule 19) rather than the dense one."""
        return self.block_k is not None

    @property
    def num_query_blocks(self) -> int:
        """``ceil(L / block_q)`` (0 for L = 0); blocked plans only."""
        assert self.block_q is not None
        return -(-self.q_len // self.block_q)

    @property
    def num_key_blocks(self) -> int:
        """``ceil(S / block_k)`` (0 for S = 0); blocked plans only."""
        assert self.block_k is not None
        return -(-self.kv_len // self.block_k)

    def key_block_range(self, q_start: int, q_stop: int) -> tuple[int, int]:
        """``(first, stop)``: the key blocks ``first <= b < stop`` (block b holds keys
        ``b * block_k ... (b + 1) * block_k - 1``) that causal and window leave any key in, for the
        queries ``q_start <= i < q_stop`` (rule 19: the others are skipped). Blocked plans only."""
        assert self.block_k is not None
        low, high = self.key_range
        first_key = 0 if low is None else max(0, q_start + low)
        last_key = self.kv_len - 1 if high is None else min(self.kv_len - 1, q_stop - 1 + high)
        if q_stop <= q_start or last_key < first_key:
            return 0, 0
        return first_key // self.block_k, last_key // self.block_k + 1

    @property
    def group_size(self) -> int:
        """Query heads per kv head, ``Hq // Hkv`` (rule 2)."""
        return self.num_q_heads // self.num_kv_heads

    @property
    def causal_offset(self) -> int:
        """Query i may attend key j iff ``j <= i + causal_offset`` under causal (rule 7)."""
        return 0 if self.alignment == "top_left" else self.kv_len - self.q_len

    @property
    def key_range(self) -> tuple[int | None, int | None]:
        """``(low, high)``: query i may attend key j only if ``i + low <= j <= i + high`` (rule 7,
        causal and window combined; None for an unbounded side)."""
        return key_range(self.q_len, self.kv_len, causal=self.causal, alignment=self.alignment,
                         window=(self.window_left, self.window_right))

    @property
    def dropout_scale(self) -> float:
        """``1 / (1 - dropout_p)``, the factor kept probabilities are multiplied by (rule 13)."""
        return 1.0 / (1.0 - self.dropout_p)

    @property
    def heads_shape(self) -> tuple[int, ...]:
        """Leading dims of every result: ``(*B, Hq)``, or ``()`` for rank-2 inputs."""
        return (*self.batch_shape, self.num_q_heads) if self.has_head_axis else ()

    @property
    def logits_shape(self) -> tuple[int, ...]:
        """``(*B, Hq, L, S)``: the shape of the weights, and the target of mask/bias broadcasting."""
        return (*self.heads_shape, self.q_len, self.kv_len)

    @property
    def out_shape(self) -> tuple[int, ...]:
        """``(*B, Hq, L, Ev)``: the shape of out."""
        return (*self.heads_shape, self.q_len, self.value_dim)

    @property
    def lse_shape(self) -> tuple[int, ...]:
        """``(*B, Hq, L)``: the shape of lse."""
        return (*self.heads_shape, self.q_len)

    # The grouped layout of the backends (rule 2): query head h = kv head h // G, so the query heads
    # of kv head g are the G consecutive heads g*G ... g*G + G-1, and ``(*B, Hq)`` reshapes to
    # ``(*B, Hkv, G)``. Rank-2 inputs are one head here: Hkv = G = 1.

    def grouped_shape(self, last: int) -> tuple[int, ...]:
        """``(*B, Hkv, G, L, last)``: q (``last = E``) with its query heads grouped by kv head."""
        return (*self.batch_shape, self.num_kv_heads, self.group_size, self.q_len, last)

    @property
    def grouped_logits_shape(self) -> tuple[int, ...]:
        """``(*B, Hkv, G, L, S)``: the logits, mask, bias and dropout mask, grouped by kv head."""
        return self.grouped_shape(self.kv_len)

    def stacked_shape(self, last: int) -> tuple[int, ...]:
        """``(*B, Hkv, G*L, last)``: the G query heads of a kv head stacked along the query axis, so
        that one matmul per kv head serves them all (q with ``last = E``, weights with ``last = S``,
        out and d_out with ``last = Ev``)."""
        return (*self.batch_shape, self.num_kv_heads, self.group_size * self.q_len, last)

    def kv_shape(self, last: int) -> tuple[int, ...]:
        """``(*B, Hkv, S, last)``: k (``last = E``) and v (``last = Ev``), with a head axis even for
        rank-2 inputs."""
        return (*self.batch_shape, self.num_kv_heads, self.kv_len, last)

    def grouped_kv_shape(self, last: int) -> tuple[int, ...]:
        """``(*B, Hkv, G, S, last)``: a k- or v-shaped value per query head (dk, dv of each query head
        before the sum over its group)."""
        return (*self.batch_shape, self.num_kv_heads, self.group_size, self.kv_len, last)

    @property
    def num_rows(self) -> int:
        """``prod(B) * Hq``: one row per batch element and query head (1 for rank-2 inputs)."""
        return math.prod(self.batch_shape) * self.num_q_heads

    def rows_shape(self, *tail: int) -> tuple[int, ...]:
        """``(prod(B) * Hq, *tail)``: one head per row, batch dims and heads flattened in order (q
        ``(rows, L, E)``, logits ``(rows, L, S)``, lse ``(rows, L)``)."""
        return (self.num_rows, *tail)
