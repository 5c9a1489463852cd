"""The NumPy backend: SPEC.md in plain NumPy (bfloat16 inputs through ml_dtypes), with its own
analytic backward pass (the standard softmax backward, rule 14; no autodiff library)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..plan import AttentionPlan
from ..broadcasting import reduce_to_shape
from .base import Backend


@dataclass
class _Forward:
    """The forward pass on grouped arrays (``(*B, Hkv, G, L, S)`` for logits-shaped ones), kept for
    the backward pass. ``multiplier`` is the dropout multiplier ``keep / (1 - p)``, or None without a
    dropout mask."""

    q4: np.ndarray  # (*B, Hkv, G*L, E), compute dtype
    k4: np.ndarray  # (*B, Hkv, S, E)
    v4: np.ndarray  # (*B, Hkv, S, Ev)
    capped: np.ndarray | None  # tanh(raw / cap) with a softcap
    weights: np.ndarray
    dropped: np.ndarray  # weights after dropout (the weights themselves without)
    multiplier: np.ndarray | None
    lse: np.ndarray
    out: np.ndarray  # (*B, Hkv, G*L, Ev), compute dtype


def _forward(plan: AttentionPlan, q: Any, k: Any, v: Any, mask: Any, bias: Any, dropout_mask: Any) -> _Forward:
    compute = np.dtype(plan.compute_dtype)
    lead, hkv, group = plan.batch_shape, plan.num_kv_heads, plan.group_size
    length, keys = plan.q_len, plan.kv_len
    grouped = (*lead, hkv, group, length, keys)  # GQA: q head h = kv head h // group

    # The query heads of one kv head are stacked along the query axis: one matmul per kv head.
    q4 = q.astype(compute).reshape(*lead, hkv, group * length, plan.head_dim)
    k4 = k.astype(compute).reshape(*lead, hkv, keys, plan.head_dim)
    v4 = v.astype(compute).reshape(*lead, hkv, keys, plan.value_dim)

    logits = np.matmul(q4, np.swapaxes(k4, -1, -2)).reshape(grouped) * compute.type(plan.scale)
    capped = None
    if plan.softcap is not None:
        cap = compute.type(plan.softcap)
        capped = np.tanh(logits / cap)
        logits = cap * capped
    if bias is not None:
        logits = logits + np.broadcast_to(bias.astype(compute), plan.logits_shape).reshape(grouped)

    allowed = logits != -np.inf
    if mask is not None:
        allowed &= np.broadcast_to(mask, plan.logits_shape).reshape(grouped)
    low, high = plan.key_range
    key_minus_query = np.arange(keys) - np.arange(length)[:, None]
    if low is not None:
        allowed &= key_minus_query >= low
    if high is not None:
        allowed &= key_minus_query <= high

    masked = np.where(allowed, logits, -np.inf)
    row_max = np.max(masked, axis=-1, keepdims=True, initial=-np.inf)
    row_max = np.where(row_max == -np.inf, 0, row_max)
    unnormalized = np.exp(masked - row_max)
    denominator = unnormalized.sum(axis=-1, keepdims=True)
    fully_excluded = denominator == 0
    safe_denominator = np.where(fully_excluded, 1, denominator)
    weights = unnormalized / safe_denominator
    lse = np.where(fully_excluded, -np.inf, row_max + np.log(safe_denominator))

    multiplier = None
    dropped = weights
    if dropout_mask is not None:
        keep = np.broadcast_to(dropout_mask, plan.logits_shape).reshape(grouped)
        multiplier = np.where(keep, compute.type(plan.dropout_scale), compute.type(0))
        dropped = weights * multiplier

    out = np.matmul(dropped.reshape(*lead, hkv, group * length, keys), v4)
    return _Forward(q4, k4, v4, capped, weights, dropped, multiplier, lse, out)


class NumpyBackend(Backend):
    name = "numpy"
    framework = "numpy"

    def _attention(
        self, plan: AttentionPlan, q: Any, k: Any, v: Any, mask: Any, bias: Any, dropout_mask: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        f = _forward(plan, q, k, v, mask, bias, dropout_mask)
        return (
            f.out.astype(q.dtype).reshape(plan.out_shape),
            f.weights.reshape(plan.logits_shape),
            f.lse.reshape(plan.lse_shape),
        )

    def _attention_vjp(
        self, plan: AttentionPlan, q: Any, k: Any, v: Any, mask: Any, bias: Any, dropout_mask: Any, d_out: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """The softmax backward pass: with P the weights, Z the dropout multiplier (1 without),
        dV = (P Z)ᵀ dO, dP = Z (dO Vᵀ), dS = P (dP - rowsum(P dP)), dLogits = dS (1 - tanh²) under a
        softcap, dQ = scale dLogits K, dK = scale dLogitsᵀ Q; sums over the query heads of a kv head."""
        f = _forward(plan, q, k, v, mask, bias, dropout_mask)
        compute = np.dtype(plan.compute_dtype)
        lead, hkv, group = plan.batch_shape, plan.num_kv_heads, plan.group_size
        length, keys = plan.q_len, plan.kv_len
        grouped = (*lead, hkv, group, length, keys)
        stacked = (*lead, hkv, group * length, keys)

        d_out4 = d_out.astype(compute).reshape(*lead, hkv, group * length, plan.value_dim)
        dv = np.matmul(np.swapaxes(f.dropped.reshape(stacked), -1, -2), d_out4)
        d_weights = np.matmul(d_out4, np.swapaxes(f.v4, -1, -2)).reshape(grouped)
        if f.multiplier is not None:
            d_weights = d_weights * f.multiplier
        row_dot = (f.weights * d_weights).sum(axis=-1, keepdims=True)
        d_logits = f.weights * (d_weights - row_dot)  # exactly 0 wherever the weight is 0
        d_bias = None
        if bias is not None:
            d_bias = np.asarray(reduce_to_shape(d_logits.reshape(plan.logits_shape), bias.shape).astype(bias.dtype))
        if f.capped is not None:
            d_logits = d_logits * (1 - f.capped * f.capped)
        d_raw = d_logits.reshape(stacked) * compute.type(plan.scale)
        dq = np.matmul(d_raw, f.k4)
        dk = np.matmul(np.swapaxes(d_raw, -1, -2), f.q4)
        return (
            dq.astype(q.dtype).reshape(q.shape),
            dk.astype(k.dtype).reshape(k.shape),
            dv.astype(v.dtype).reshape(v.shape),
            d_bias,
        )

    def asarray(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x)

    def to_numpy(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x)
