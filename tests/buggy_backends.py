"""Deliberately wrong attention implementations: the properties must catch each one.

Each is the NumPy backend with one plausible bug, so a failure can only come from that bug.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from attention_ref.backends.numpy import NumpyBackend
from attention_ref.plan import AttentionPlan


class ScaleFromValueDim(NumpyBackend):
    """The scale 1/sqrt(E) (the default) is replaced by 1/sqrt(Ev)."""

    name = "scale_from_value_dim"

    def _attention(self, plan: AttentionPlan, q, k, v, mask, bias, dropout_mask):
        if plan.scale == 1.0 / math.sqrt(plan.head_dim):
            plan = dataclasses.replace(plan, scale=1.0 / math.sqrt(max(plan.value_dim, 1)))
        return super()._attention(plan, q, k, v, mask, bias, dropout_mask)


class AlwaysTopLeft(NumpyBackend):
    """Ignores the alignment argument: causal is always top-left."""

    name = "always_top_left"

    def _attention(self, plan: AttentionPlan, q, k, v, mask, bias, dropout_mask):
        return super()._attention(dataclasses.replace(plan, alignment="top_left"), q, k, v, mask, bias, dropout_mask)


class GqaTileOrder(NumpyBackend):
    """Maps query head h to kv head h % Hkv (tile order) instead of h // (Hq/Hkv)."""

    name = "gqa_tile_order"

    def _attention(self, plan: AttentionPlan, q, k, v, mask, bias, dropout_mask):
        if plan.group_size > 1:
            k, v = (np.tile(x, (plan.group_size, 1, 1)) for x in (k, v))
            plan = dataclasses.replace(plan, num_kv_heads=plan.num_q_heads)
        return super()._attention(plan, q, k, v, mask, bias, dropout_mask)


class MeanOfValuesOnFullyMaskedRows(NumpyBackend):
    """Fully excluded rows give mean(V) over all keys (the jax.nn convention), not 0."""

    name = "mean_v_on_fully_masked_rows"

    def _attention(self, plan: AttentionPlan, q, k, v, mask, bias, dropout_mask):
        out, weights, lse = super()._attention(plan, q, k, v, mask, bias, dropout_mask)
        fully = (weights.sum(axis=-1) == 0)[..., None]
        if plan.kv_len and fully.any():
            mean_v = np.repeat(v.astype(np.float64).mean(axis=-2, keepdims=True), plan.group_size, axis=-3) \
                if plan.has_head_axis else v.astype(np.float64).mean(axis=-2, keepdims=True)
            out = np.where(fully, mean_v, out).astype(out.dtype)
        return out, weights, lse


class Float64ComputedInFloat32(NumpyBackend):
    """Computes float64 inputs in float32 and casts back (a silent downcast)."""

    name = "float64_in_float32"

    def _attention(self, plan: AttentionPlan, q, k, v, mask, bias, dropout_mask):
        plan = dataclasses.replace(plan, compute_dtype="float32")
        out, weights, lse = super()._attention(plan, q, k, v, mask, bias, dropout_mask)
        return out, weights.astype(np.float64), lse.astype(np.float64)


class NoMaxSubtraction(NumpyBackend):
    """softmax as exp(x) / sum(exp(x)) without subtracting the row max."""

    name = "no_max_subtraction"

    def _attention(self, plan: AttentionPlan, q, k, v, mask, bias, dropout_mask):
        out, weights, lse = super()._attention(plan, q, k, v, mask, bias, dropout_mask)
        with np.errstate(over="ignore", invalid="ignore"):
            unnormalized = np.exp(lse[..., None]) * weights  # overflows exactly where the naive one does
            weights = unnormalized / unnormalized.sum(axis=-1, keepdims=True)
        v5 = np.repeat(v, plan.group_size, axis=-3) if plan.has_head_axis else v
        with np.errstate(invalid="ignore"):
            out = np.matmul(weights, v5.astype(weights.dtype)).astype(out.dtype)
        return out, weights, lse


class CausalOffByOne(NumpyBackend):
    """The causal test is j <= i + offset + 1: each query also sees the next key."""

    name = "causal_off_by_one"

    def _attention(self, plan: AttentionPlan, q, k, v, mask, bias, dropout_mask):
        if plan.causal:
            leaky = np.arange(plan.kv_len) <= np.arange(plan.q_len)[:, None] + plan.causal_offset + 1
            mask = leaky if mask is None else mask & leaky
            plan = dataclasses.replace(plan, causal=False, has_mask=True)
        return super()._attention(plan, q, k, v, mask, bias, dropout_mask)


BUGGY_BACKENDS = (ScaleFromValueDim, AlwaysTopLeft, GqaTileOrder, MeanOfValuesOnFullyMaskedRows,
                  Float64ComputedInFloat32, NoMaxSubtraction, CausalOffByOne)
