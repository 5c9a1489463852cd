"""The parameters of the reference multi-head attention layer (SPEC.md "The multi-head attention
layer"), in one einsum-shaped layout that every framework's layer maps onto exactly.

Shape letters: d_q, d_k, d_v the query, key and value features; H query heads, Hkv kv heads
(``H % Hkv == 0``; query head h uses kv head ``h // (H // Hkv)``); hd the q/k head dim, hd_v the
value head dim; d_out the output features.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from ..frameworks import framework_of, shape_of


class MHAParams(NamedTuple):
    """The weights and biases of one multi-head attention layer (a NamedTuple, so a JAX pytree).

    ===========  ==================  ======  ==============
    weight       shape               bias    shape
    ===========  ==================  ======  ==============
    ``wq``       ``(d_q, H, hd)``    ``bq``  ``(H, hd)``
    ``wk``       ``(d_k, Hkv, hd)``  ``bk``  ``(Hkv, hd)``
    ``wv``       ``(d_v, Hkv, hd_v)`` ``bv`` ``(Hkv, hd_v)``
    ``wo``       ``(H, hd_v, d_out)`` ``bo`` ``(d_out,)``
    ===========  ==================  ======  ==============

    Each bias is optional (None: no bias). Projections are ``q = einsum("...ld,dhk->...hlk", query,
    wq) + bq`` and ``out = einsum("...hlv,hvo->...lo", o, wo) + bo``.
    """

    wq: Any
    wk: Any
    wv: Any
    wo: Any
    bq: Any = None
    bk: Any = None
    bv: Any = None
    bo: Any = None

    @property
    def num_heads(self) -> int:
        """H, the query heads."""
        return shape_of(self.wq)[1]

    @property
    def num_kv_heads(self) -> int:
        """Hkv, the key/value heads."""
        return shape_of(self.wk)[1]

    @property
    def head_dim(self) -> int:
        """hd, the q/k head dim."""
        return shape_of(self.wq)[2]

    @property
    def value_dim(self) -> int:
        """hd_v, the value head dim."""
        return shape_of(self.wv)[2]

    @property
    def out_features(self) -> int:
        """d_out."""
        return shape_of(self.wo)[2]

    def map(self, fn: Callable[[Any], Any]) -> MHAParams:
        """The parameters with ``fn`` applied to every array (None biases stay None), e.g.
        ``params.map(np.asarray)`` or ``params.map(torch.from_numpy)``."""
        return MHAParams(*(None if x is None else fn(x) for x in self))


def average_weights(weights: Any) -> Any:
    """torch ``nn.MultiheadAttention``'s head-averaged view of per-head weights ``(B..., H, L, S)``:
    their mean over the head axis, ``(B..., L, S)``, in the weights' dtype and framework."""
    if framework_of(weights) == "torch":
        return weights.mean(dim=-3)
    return weights.mean(axis=-3)
