"""The plan of a validated multi-head attention layer call (SPEC.md rules 15-18): its shapes, dtypes
and the :class:`AttentionPlan` of the per-head attention it runs on the projected inputs.

Shape letters: B... batch dims, L queries, S keys, d_q, d_k, d_v the input features, H query heads,
Hkv kv heads, hd the q/k head dim, hd_v the value head dim, d_out the output features.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..plan import AttentionPlan


@dataclass(frozen=True)
class LayerPlan:
    """A validated ``multi_head_attention`` call, independent of the framework that runs it.

    ``attention`` is the plan of the per-head attention on the projected q ``(*B, H, L, hd)``,
    k ``(*B, Hkv, S, hd)``, v ``(*B, Hkv, S, hd_v)``, which are in the compute dtype: its ``dtype``
    and ``compute_dtype`` are both the layer's compute dtype (rule 17), and its mask is the layer's
    mask and key padding mask combined (rule 16).
    """

    attention: AttentionPlan
    #: The layer's input (and output) dtype.
    dtype: str
    query_features: int
    key_features: int
    value_features: int
    out_features: int
    #: Which of bq, bk, bv, bo are given.
    has_biases: tuple[bool, bool, bool, bool]
    has_key_padding_mask: bool

    @property
    def compute_dtype(self) -> str:
        return self.attention.compute_dtype

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return self.attention.batch_shape

    @property
    def out_shape(self) -> tuple[int, ...]:
        """``(*B, L, d_out)``."""
        return (*self.batch_shape, self.attention.q_len, self.out_features)

    def projected_shape(self, heads: int, length: int, last: int) -> tuple[int, ...]:
        """``(*B, heads, length, last)``: a projected q, k or v (o too: ``(*B, H, L, hd_v)``)."""
        return (*self.batch_shape, heads, length, last)

    @property
    def q_shape(self) -> tuple[int, ...]:
        a = self.attention
        return self.projected_shape(a.num_q_heads, a.q_len, a.head_dim)

    @property
    def k_shape(self) -> tuple[int, ...]:
        a = self.attention
        return self.projected_shape(a.num_kv_heads, a.kv_len, a.head_dim)

    @property
    def v_shape(self) -> tuple[int, ...]:
        a = self.attention
        return self.projected_shape(a.num_kv_heads, a.kv_len, a.value_dim)

    @property
    def padding_shape(self) -> tuple[int, ...]:
        """``(*B, S)``: the key padding mask's shape."""
        return (*self.batch_shape, self.attention.kv_len)

    @property
    def key_padding_shape(self) -> tuple[int, ...]:
        """``(*B, 1, 1, S)``: the key padding mask ``(*B, S)`` as a mask of the logits (rule 16)."""
        return (*self.batch_shape, 1, 1, self.attention.kv_len)
