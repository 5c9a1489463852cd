"""The NumPy backend: SPEC.md in plain NumPy (bfloat16 inputs through ml_dtypes)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..validation import AttentionPlan
from .base import Backend


class NumpyBackend(Backend):
    name = "numpy"
    framework = "numpy"

    def _attention(
        self, plan: AttentionPlan, q: Any, k: Any, v: Any, mask: Any, bias: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        compute = np.dtype(plan.compute_dtype)
        lead, hkv, group = plan.batch_shape, plan.num_kv_heads, plan.group_size
        length, keys = plan.q_len, plan.kv_len
        grouped = (*lead, hkv, group, length, keys)  # GQA: q head h = kv head h // group

        # The query heads of one kv head are stacked along the query axis: one matmul per kv head.
        q4 = q.astype(compute).reshape(*lead, hkv, group * length, plan.head_dim)
        k4 = k.astype(compute).reshape(*lead, hkv, keys, plan.head_dim)
        v4 = v.astype(compute).reshape(*lead, hkv, keys, plan.value_dim)

        logits = np.matmul(q4, np.swapaxes(k4, -1, -2)).reshape(grouped) * compute.type(plan.scale)
        if plan.softcap is not None:
            cap = compute.type(plan.softcap)
            logits = cap * np.tanh(logits / cap)
        if bias is not None:
            logits = logits + np.broadcast_to(bias.astype(compute), plan.logits_shape).reshape(grouped)

        allowed = logits != -np.inf
        if mask is not None:
            allowed &= np.broadcast_to(mask, plan.logits_shape).reshape(grouped)
        if plan.causal:
            allowed &= np.arange(keys) <= np.arange(length)[:, None] + plan.causal_offset

        masked = np.where(allowed, logits, -np.inf)
        row_max = np.max(masked, axis=-1, keepdims=True, initial=-np.inf)
        row_max = np.where(row_max == -np.inf, 0, row_max)
        unnormalized = np.exp(masked - row_max)
        denominator = unnormalized.sum(axis=-1, keepdims=True)
        fully_excluded = denominator == 0
        safe_denominator = np.where(fully_excluded, 1, denominator)
        weights = unnormalized / safe_denominator
        lse = np.where(fully_excluded, -np.inf, row_max + np.log(safe_denominator))

        out = np.matmul(weights.reshape(*lead, hkv, group * length, keys), v4).astype(q.dtype)
        return (
            out.reshape(plan.out_shape),
            weights.reshape(plan.logits_shape),
            lse.reshape(plan.lse_shape),
        )

    def asarray(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x)

    def to_numpy(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x)
