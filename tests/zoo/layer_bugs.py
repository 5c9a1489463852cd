"""The layer zoo: one multi-head attention layer in torch, written the way people write one (nn.Linear
projections, a head split with view and transpose, torch ``nn.MultiheadAttention``'s mask
conventions), built by a factory from :class:`~attention_ref.layers.MHAParams`, with each planted
bug a keyword switch (``make_layer(gqa_tile_order=True)``), and the table of which
``check_layer`` property must catch each one.

The correct layer (``make_layer()``) is checked with every feature (``LAYER_SUPPORTS``) and must pass
every property; each bug is checked with the features it needs (``LayerBug.supports``) and the
property it names must report FAIL (seed 0, ``tests/test_layer_zoo.py``).

Calling convention (``check_layer(make_layer(), framework="torch", **LAYER_DECLARATIONS)``)::

    layer(query, key, value, mask=None, key_padding_mask=None, causal=False, dropout_p=0.0,
          dropout_mask=None) -> (out, weights)

* query ``(B, L, d_q)``, key ``(B, S, d_k)``, value ``(B, S, d_v)``, one float dtype;
* ``mask``: bool, **True = masked out** (torch MHA's polarity), ``(L, S)`` or ``(B * H, L, S)``
  batch-major (row ``b * H + h``); ``key_padding_mask``: bool ``(B, S)``, **True = padding**;
  ``causal``: top-left; ``dropout_mask``: bool keep-mask ``(B, H, L, S)``;
* computed in float32 for half-precision inputs, returned in the input dtype; a fully masked row
  gives o = 0 per head (out = bo);
* returns ``(out, weights)``: out ``(B, L, d_out)`` and the weights **averaged over the heads,
  after dropout** ``(B, L, S)``, as torch does.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from attention_ref.layers import MHAParams

#: The features of the zoo's layer (``check_layer``'s ``supports``): all of them.
LAYER_SUPPORTS = ("mask", "key_padding_mask", "causal", "dropout", "weights", "gqa", "kv_features", "head_dim",
                  "value_head_dim", "out_features", "partial_biases")
#: The zoo layer's calling convention, as ``check_layer`` declarations.
LAYER_DECLARATIONS: dict[str, Any] = dict(returns=("out", "weights"), weights="averaged", weights_dropout="after",
                                          mask_polarity="ignore", mask_layout="torch", fully_masked="zero")


class ZooAttention(nn.Module):
    """The zoo's multi-head attention layer (module docstring), holding ``params`` (torch tensors)."""

    def __init__(self, params: MHAParams, bugs: frozenset[str]) -> None:
        super().__init__()
        self.bugs = bugs
        (d_q, self.heads, self.head_dim), self.kv_heads = params.wq.shape, params.wk.shape[1]
        self.value_dim, d_out = params.wv.shape[2], params.wo.shape[2]
        self.d_q = d_q
        wq, wk, wv, bq, bk, bv = params.wq, params.wk, params.wv, params.bq, params.bk, params.bv
        if "kdim_vdim_swapped" in bugs:
            wk, wv, bk, bv = wv, wk, bv, bk
        self.q_proj = self._linear(wq, bq)
        self.k_proj = self._linear(wk, bk)
        self.v_proj = self._linear(wv, bv)
        self.out_proj = nn.Linear(self.heads * self.value_dim, d_out, bias=params.bo is not None,
                                  dtype=params.wo.dtype)
        with torch.no_grad():
            self.out_proj.weight.copy_(params.wo.reshape(-1, d_out).T)
            if params.bo is not None:
                self.out_proj.bias.copy_(params.bo)

    def _linear(self, w: torch.Tensor, b: torch.Tensor | None) -> nn.Linear:
        """nn.Linear(d_in, heads * hd) holding w ``(d_in, heads, hd)`` as its ``(out, in)`` weight."""
        d_in, heads, dim = w.shape
        linear = nn.Linear(d_in, heads * dim, bias=b is not None, dtype=w.dtype)
        with torch.no_grad():
            if "projection_weights_not_transposed" in self.bugs:
                linear.weight.copy_(w.reshape(d_in, heads * dim))  # (in, out) copied as (out, in): square only
            else:
                linear.weight.copy_(w.reshape(d_in, heads * dim).T)
            if b is not None:
                linear.bias.copy_(b.reshape(heads * dim))
        return linear

    def _split(self, x: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
        """(B, T, heads * dim) -> (B, heads, T, dim): feature h * dim + d is head h."""
        batch, length, _ = x.shape
        if "heads_split_feature_major" in self.bugs:
            return x.view(batch, length, dim, heads).permute(0, 3, 1, 2)  # feature d * heads + h
        return x.view(batch, length, heads, dim).transpose(1, 2)

    def _merge(self, o: torch.Tensor) -> torch.Tensor:
        batch, heads, length, dim = o.shape
        if "heads_split_feature_major" in self.bugs:
            return o.permute(0, 2, 3, 1).reshape(batch, length, heads * dim)
        return o.transpose(1, 2).reshape(batch, length, heads * dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, causal: bool = False, dropout_p: float = 0.0,
                dropout_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        bugs, heads = self.bugs, self.heads
        if "keras_argument_order" in bugs:  # a keras-style inner call(query, value, key) given (query, key, value)
            key, value = value, key
        dtype = query.dtype
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        batch, length, keys = query.shape[0], query.shape[1], key.shape[1]
        q = self._split(self.q_proj(query), heads, self.head_dim).to(compute)
        k = self._split(self.k_proj(key), self.kv_heads, self.head_dim).to(compute)
        v = self._split(self.v_proj(value), self.kv_heads, self.value_dim).to(compute)
        group = heads // self.kv_heads
        if group > 1:
            if "gqa_tile_order" in bugs:
                k, v = k.repeat(1, group, 1, 1), v.repeat(1, group, 1, 1)
            else:
                k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scale = 1 / math.sqrt(self.d_q if "scale_from_model_dim" in bugs else self.head_dim)
        logits = (q @ k.transpose(-1, -2)) * scale
        allowed = torch.ones(batch, heads, length, keys, dtype=torch.bool)
        if mask is not None:
            attend = mask if "mask_polarity_as_sdpa" in bugs else ~mask  # torch MHA: True = masked out
            allowed = allowed & (attend.view(batch, heads, length, keys) if attend.dim() == 3 else attend)
        if key_padding_mask is not None:
            if "padding_mask_head_major" in bugs:
                expanded = key_padding_mask.repeat(heads, 1)  # row h * B + b
            else:
                expanded = key_padding_mask.repeat_interleave(heads, dim=0)  # row b * H + h
            allowed = allowed & ~expanded.view(batch, heads, 1, keys)
        if causal and not (key_padding_mask is not None and "causal_dropped_with_key_padding" in bugs):
            allowed = allowed & torch.ones(length, keys, dtype=torch.bool).tril()
        weights = torch.softmax(logits.masked_fill(~allowed, -torch.inf), dim=-1)
        if "nan_on_fully_masked_rows" not in bugs:
            weights = torch.where(allowed.any(dim=-1, keepdim=True), weights, 0.0)
        dropped = weights
        if dropout_mask is not None:
            rescale = 1.0 if "dropout_without_rescale" in bugs else 1.0 / (1.0 - dropout_p)
            dropped = weights * dropout_mask * rescale
        o = self._merge(dropped @ v).to(dtype)
        out = self.out_proj(o)
        if "output_bias_missing" in bugs and self.out_proj.bias is not None:
            out = out - self.out_proj.bias
        if "weights_not_averaged" in bugs:
            returned = dropped
        elif "weights_averaged_before_dropout" in bugs:
            returned = weights.mean(dim=1)
        else:
            returned = dropped.mean(dim=1)
        return out, returned


@dataclass(frozen=True)
class LayerBug:
    """One planted bug: its switch, a one-line description, the property that catches it and the
    features it is checked with."""

    name: str
    description: str
    catches: str
    supports: tuple[str, ...]

    @property
    def make(self) -> Callable[[MHAParams], ZooAttention]:
        return make_layer(**{self.name: True})


LAYER_BUGS: tuple[LayerBug, ...] = (
    LayerBug("heads_split_feature_major", "splits heads as feature d * H + h (view(B, L, hd, H)), not h * hd + d",
             "identity_projections_equal_attention", ()),
    LayerBug("projection_weights_not_transposed", "copies the (in, out) projection weights into nn.Linear's (out, in) "
             "weight without the transpose (runs for square projections)", "layer_matches_reference", ()),
    LayerBug("scale_from_model_dim", "scales the logits by 1/sqrt(d_model), not 1/sqrt(hd)",
             "layer_matches_reference", ()),
    LayerBug("kdim_vdim_swapped", "builds the key projection from the value's weights and the value projection "
             "from the key's (kdim and vdim swapped)", "layer_matches_reference", ()),
    LayerBug("keras_argument_order", "calls a keras-style (query, value, key) inner function with (query, key, value)",
             "layer_matches_reference", ()),
    LayerBug("output_bias_missing", "never adds the output projection's bias", "layer_matches_reference", ()),
    LayerBug("mask_polarity_as_sdpa", "reads torch MHA's bool mask (True = masked out) as SDPA's (True = attend)",
             "layer_matches_reference", ("mask",)),
    LayerBug("causal_dropped_with_key_padding", "drops the causal mask whenever a key padding mask is given",
             "layer_matches_reference", ("causal", "key_padding_mask")),
    LayerBug("padding_mask_head_major", "expands the key padding mask to (B * H, 1, S) head-major (repeat: row "
             "h * B + b), read batch-major", "key_padding_equals_mask", ("mask", "key_padding_mask")),
    LayerBug("gqa_tile_order", "repeats the kv heads in tile order (repeat: head h uses kv head h % Hkv), not "
             "h // (H / Hkv)", "gqa_equals_repeated_kv_heads", ("gqa",)),
    LayerBug("weights_not_averaged", "returns the per-head weights (B, H, L, S) where head-averaged ones are declared",
             "weights_follow_declared_convention", ("weights",)),
    LayerBug("weights_averaged_before_dropout", "returns the head-averaged weights before dropout where torch's "
             "after-dropout weights are declared", "weights_follow_declared_convention", ("weights", "dropout")),
    LayerBug("dropout_without_rescale", "applies the dropout keep-mask without the 1 / (1 - p) rescale",
             "dropout_matches_explicit_mask", ("dropout",)),
    LayerBug("nan_on_fully_masked_rows", "a plain softmax over -inf logits: a fully masked query row gives NaN",
             "fully_masked_rows_follow_declared_convention", ("mask",)),
)
LAYER_BUGS_BY_NAME = {bug.name: bug for bug in LAYER_BUGS}
#: Every switch of ``make_layer``.
LAYER_BUG_SWITCHES = frozenset(LAYER_BUGS_BY_NAME)


@functools.cache
def make_layer(**bugs: bool) -> Callable[[MHAParams], ZooAttention]:
    """The factory ``make(params) -> ZooAttention`` with the named bugs planted (ValueError for an
    unknown name)."""
    unknown = set(bugs) - LAYER_BUG_SWITCHES
    if unknown:
        raise ValueError(f"unknown bugs {sorted(unknown)}")
    planted = frozenset(name for name, on in bugs.items() if on)

    def make(params: MHAParams) -> ZooAttention:
        return ZooAttention(params, planted)

    make.__name__ = "_".join(sorted(planted)) or "zoo_attention"
    return make


def markdown_table() -> str:
    """The README's table of the layer zoo: bug, what it does, the property that catches it."""
    lines = ["| bug | what it does | caught by |", "|---|---|---|"]
    lines += [f"| `{bug.name}` | {bug.description} | `{bug.catches}` |" for bug in LAYER_BUGS]
    return "\n".join(lines)
