"""One call of the multi-head attention layer as NumPy data (:class:`LayerCase`), with its float64
oracle and its tolerance (``attention_ref.tolerance.layer``), for the layer's tests and checkers.

Shape letters as in ``attention_ref.layers.params``: query ``(*B, L, d_q)``, key ``(*B, S, d_k)``,
value ``(*B, S, d_v)``; the per-head attention on q ``(*B, H, L, hd)``, k ``(*B, Hkv, S, hd)``,
v ``(*B, Hkv, S, hd_v)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..layers.params import MHAParams
from ..plan import AttentionOptions
from ..result import AttentionOutput
from ..tolerance import calibrated_error_bounds
from ..tolerance.layer import (
    LayerErrorBounds,
    logit_perturbation,
    output_bound,
    projection_bound,
    value_perturbation,
)
from .cases import AttentionCase


@dataclass(frozen=True, eq=False)
class LayerCase(AttentionOptions):
    """The inputs of one ``multi_head_attention`` call: NumPy query, key, value and params (one
    dtype), key_padding_mask (bool ``(*B, S)``, True = a real token, or None) and the per-head
    attention's options (mask, bias, dropout mask broadcastable to ``(*B, H, L, S)``). Compare and hash
    by identity."""

    query: np.ndarray
    key: np.ndarray
    value: np.ndarray
    params: MHAParams
    key_padding_mask: np.ndarray | None = None

    __eq__ = object.__eq__
    __hash__ = object.__hash__

    @property
    def dtype(self) -> str:
        return str(self.query.dtype)

    @property
    def default_compute_dtype(self) -> str:
        return "float64" if self.dtype == "float64" else "float32"

    def replace(self, **changes: Any) -> LayerCase:
        return dataclasses.replace(self, **changes)

    def record(self) -> dict[str, Any]:
        """The case as plain values (``report.case_record``): ``kind`` "layer", ``dtype``, the
        ``shapes`` of query, key, value, key_padding_mask, mask and bias (None when absent), the
        scalar ``options`` (window as a list) and ``repr``."""
        named = {"query": self.query, "key": self.key, "value": self.value,
                 "key_padding_mask": self.key_padding_mask, "mask": self.mask, "bias": self.bias}
        options = {key: list(value) if isinstance(value, tuple) else value
                   for key, value in self.scalar_keywords().items()}
        return {"kind": "layer", "dtype": self.dtype,
                "shapes": {name: None if x is None else list(np.shape(x)) for name, x in named.items()},
                "options": options, "repr": repr(self)}

    def options(self) -> AttentionOptions:
        """The per-head attention's options (without the key padding mask)."""
        return AttentionOptions(**self.as_keywords())

    def keywords(self) -> dict[str, Any]:
        """The keywords of ``multi_head_attention`` for this case (arrays as NumPy; the layer takes no
        score or mask program, rule 22)."""
        keywords = {name: x for name, x in self.as_keywords().items() if name not in ("score_mod", "mask_mod")}
        return {**keywords, "key_padding_mask": self.key_padding_mask}

    def params64(self) -> MHAParams:
        return self.params.map(lambda x: np.asarray(x, np.float64))

    def projected(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The exact (float64) projected q, k, v (rule 15)."""
        p = self.params64()
        out = []
        for x, w, b in ((self.query, p.wq, p.bq), (self.key, p.wk, p.bk), (self.value, p.wv, p.bv)):
            y = np.einsum("...ld,dhk->...hlk", np.asarray(x, np.float64), w)
            out.append(y if b is None else y + b[:, None, :])
        return out[0], out[1], out[2]

    def combined_mask(self) -> np.ndarray | None:
        """mask and key padding mask combined by intersection (rule 16), or None."""
        if self.key_padding_mask is None:
            return self.mask
        padding = self.key_padding_mask[..., None, None, :]
        return padding if self.mask is None else self.mask & padding

    def attention_case(self) -> AttentionCase:
        """The per-head attention on the exact projected q, k, v (float64)."""
        q, k, v = self.projected()
        return AttentionCase(q=q, k=k, v=v, **{**self.as_keywords(), "mask": self.combined_mask()})

    def oracle(self) -> AttentionOutput:
        """The float64 oracle: out ``(*B, L, d_out)``, per-head weights and lse, all float64."""
        attention = self.attention_case().oracle()
        p = self.params64()
        out = np.einsum("...hlv,hvo->...lo", np.asarray(attention.out, np.float64), p.wo)
        if p.bo is not None:
            out = out + p.bo
        return AttentionOutput(out, attention.weights, attention.lse)

    def bounds(self, *, compute_dtype: str | None = None, out_dtype: str | None = None,
               intermediate_dtype: str | None = None, calibrated: bool = False) -> LayerErrorBounds:
        """The layer rule's bounds (``attention_ref.tolerance.layer``) for this case, computed in
        ``compute_dtype`` (default the spec's) and returned in ``out_dtype`` (default the input
        dtype). ``intermediate_dtype``: the dtype a framework layer stores its projected q, k, v and o
        in (None: the compute dtype, as SPEC.md's layer). ``calibrated``: the per-head attention held to
        the calibrated rule for other people's kernels, in the intermediate dtype."""
        compute = compute_dtype or self.default_compute_dtype
        storage = intermediate_dtype or compute
        p = self.params64()
        q, k, v = self.projected()
        dq, dk, dv = (projection_bound(np.asarray(x, np.float64), w, b, y, compute_dtype=compute,
                                       storage_dtype=storage)
                      for x, w, b, y in ((self.query, p.wq, p.bq, q), (self.key, p.wk, p.bk, k),
                                         (self.value, p.wv, p.bv, v)))
        case = self.attention_case()
        group = q.shape[-3] // k.shape[-3]
        k_rep, v_rep = case.repeated_kv()
        dk_rep, dv_rep = np.repeat(dk, group, axis=-3), np.repeat(dv, group, axis=-3)
        allowed = case.allowed()
        extra = logit_perturbation(q, k_rep, dq, dk_rep, scale=case.resolved_scale, allowed=allowed)
        attention = case.bounds(compute_dtype=compute, out_dtype=storage, extra_logit_error=extra)
        oracle = case.oracle()
        if calibrated:
            attention = calibrated_error_bounds(
                attention, q, k_rep, v_rep, allowed=allowed, bias=case.bias, scale=case.resolved_scale,
                softcap=case.softcap, expected_out=oracle.out, expected_weights=oracle.weights,
                expected_lse=oracle.lse, dtype=storage, dropout_multiplier=case.dropout_multiplier())
        o_bound = attention.out + value_perturbation(dv_rep, allowed=allowed,
                                                     dropout_multiplier=case.dropout_multiplier())
        out = output_bound(np.asarray(oracle.out, np.float64), o_bound, p.wo, p.bo, self.oracle().out,
                           compute_dtype=compute, out_dtype=out_dtype or self.dtype)
        rule = "calibrated" if calibrated else "derived"
        return LayerErrorBounds(out, attention.weights,
                                f"{rule} layer bound for {compute} compute, {storage} intermediates, "
                                f"{out_dtype or self.dtype} out (attention_ref/tolerance/layer.py)")

