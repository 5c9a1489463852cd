"""The NumPy backend: SPEC.md in plain NumPy, with its own analytic backward pass (rule 14, no
autodiff library).

Shape letters: B... batch dims, Hq query heads, Hkv kv heads, G = Hq // Hkv query heads per kv head,
L queries, S keys, E q/k head dim, Ev value head dim. The steps work on the grouped layout of
``AttentionPlan`` (rule 2): q ``(*B, Hkv, G, L, E)``, k ``(*B, Hkv, S, E)``, v ``(*B, Hkv, S, Ev)``,
logits, mask, bias and dropout mask ``(*B, Hkv, G, L, S)``, lse ``(*B, Hkv, G, L)``.

Dtypes: q, k, v are float16, bfloat16 (ml_dtypes), float32 or float64, converted exactly to the
compute dtype (float32 or float64, rule 10) in which every step runs; out, dq, dk and dv are rounded
to the input dtype, weights and lse stay in the compute dtype, dbias is in bias's dtype.

The torch and jax backends have the same steps under the same names: ``grouped_inputs``,
``grouped_view``, ``logits``, ``allowed_keys``, ``softmax``, ``dropout``, ``results``, ``forward``
and ``attention_backward``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..broadcasting import reduce_to_shape
from ..frameworks import numpy_dtype
from ..layers.params import MHAParams
from ..layers.plan import LayerPlan
from ..mods import scored
from ..plan import AttentionPlan
from .base import Backend
from .numpy_blocked import blocked_backward, blocked_forward


def grouped_inputs(plan: AttentionPlan, q: Any, k: Any, v: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q ``(*B, Hq, L, E)`` as ``(*B, Hkv, G, L, E)``, k as ``(*B, Hkv, S, E)`` and v as
    ``(*B, Hkv, S, Ev)`` (rank-2 inputs gain their one head), in the compute dtype."""
    compute = np.dtype(plan.compute_dtype)
    q, k, v = (x.astype(compute) for x in (q, k, v))  # rule 10: exact, every step runs in the compute dtype
    k = k.reshape(plan.kv_shape(plan.head_dim))  # rule 1: heads first, a rank-2 input is one head
    v = v.reshape(plan.kv_shape(plan.value_dim))
    return q.reshape(plan.grouped_shape(plan.head_dim)), k, v  # rule 2: query head h uses kv head h // G


def grouped_view(plan: AttentionPlan, x: Any) -> np.ndarray | None:
    """A mask, bias or dropout mask broadcastable to ``(*B, Hq, L, S)``, as ``(*B, Hkv, G, L, S)``;
    None stays None."""
    if x is None:
        return None
    return np.broadcast_to(x, plan.logits_shape).reshape(plan.grouped_logits_shape)  # rule 2: h // G


def _int32_arange(n: int) -> np.ndarray:
    """The index arrays of rule 22's mods: int32, as FlexAttention's."""
    return np.arange(n, dtype=np.int32)


def logits(
    plan: AttentionPlan, q: np.ndarray, k: np.ndarray, scale: np.generic, softcap: np.generic | None,
    bias: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The logits ``(*B, Hkv, G, L, S)`` of q ``(*B, Hkv, G, L, E)`` and k ``(*B, Hkv, S, E)``:
    scaled, modified by ``plan.score_mod`` (rule 22), capped (softcap None: no cap) and biased (bias
    ``(*B, Hkv, G, L, S)`` or None). scale,
    softcap and bias are in the compute dtype. Also returns ``tanh(raw / softcap)`` (None without a
    softcap), which the backward pass needs."""
    # rule 10: the matmul runs in the compute dtype; the G query heads of a kv head share one matmul
    raw = np.matmul(q.reshape(plan.stacked_shape(plan.head_dim)), np.swapaxes(k, -1, -2))
    x = raw.reshape(plan.grouped_logits_shape) * scale  # rule 3
    if plan.score_mod is not None:  # rule 22: on the scaled logits, before the softcap
        modded = np.broadcast_to(scored(plan, x, _int32_arange), plan.logits_shape)
        x = modded.reshape(plan.grouped_logits_shape).astype(x.dtype)
    capped = None
    if softcap is not None:
        capped = np.tanh(x / softcap)  # rule 4
        x = softcap * capped
    if bias is not None:
        x = x + bias  # rule 5: after the softcap
    return x, capped


def allowed_keys(
    plan: AttentionPlan, x: np.ndarray, mask: np.ndarray | None, key_range: tuple[Any, Any]
) -> np.ndarray:
    """Boolean ``(*B, Hkv, G, L, S)``: the keys each query attends. x the logits, mask
    ``(*B, Hkv, G, L, S)`` or None, ``key_range = (low, high)`` as ``plan.key_range`` (query i may
    attend key j only if ``low <= j - i <= high``; None: unbounded)."""
    allowed = x != -np.inf  # rule 8: a -inf logit excludes its key
    if mask is not None:
        allowed &= mask  # rule 6
    low, high = key_range  # rule 7: causal and window, combined by plan.key_range
    key_minus_query = np.arange(plan.kv_len) - np.arange(plan.q_len)[:, None]
    if low is not None:
        allowed &= key_minus_query >= low
    if high is not None:
        allowed &= key_minus_query <= high
    return allowed


def softmax(x: np.ndarray, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """weights ``(..., L, S)`` and lse ``(..., L)`` of the logits x ``(..., L, S)`` over the allowed keys."""
    masked = np.where(allowed, x, -np.inf)
    row_max = np.max(masked, axis=-1, keepdims=True, initial=-np.inf)  # rule 9: over attended keys only
    row_max = np.where(row_max == -np.inf, 0, row_max)
    unnormalized = np.exp(masked - row_max)  # rule 9: the row max subtracted
    denominator = unnormalized.sum(axis=-1, keepdims=True)
    fully_excluded = denominator == 0  # rule 8: weights 0 and lse -inf
    safe_denominator = np.where(fully_excluded, 1, denominator)
    weights = unnormalized / safe_denominator
    lse = np.where(fully_excluded, -np.inf, row_max + np.log(safe_denominator))
    return weights, lse[..., 0]


def dropout(
    weights: np.ndarray, keep: np.ndarray | None, dropout_scale: np.generic
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(dropped, multiplier)``: the weights ``(..., L, S)`` times ``multiplier = keep / (1 - p)``
    (keep broadcastable to them; dropout_scale ``1 / (1 - p)`` in the compute dtype). Without a keep
    mask, the weights themselves and None."""
    if keep is None:
        return weights, None
    multiplier = np.where(keep, dropout_scale, weights.dtype.type(0))  # rule 13: keep / (1 - p)
    return weights * multiplier, multiplier


def results(
    plan: AttentionPlan, p: np.ndarray, v: np.ndarray, weights: np.ndarray, lse: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(out, weights, lse)`` in the plan's shapes, from the grouped (dropped) probabilities p and
    the weights ``(*B, Hkv, G, L, S)``, v ``(*B, Hkv, S, Ev)`` and lse ``(*B, Hkv, G, L)``: out
    ``(*B, Hq, L, Ev)`` in the input dtype, weights and lse in the compute dtype."""
    out = np.matmul(p.reshape(plan.stacked_shape(plan.kv_len)), v)  # rule 11: out = P·V, compute dtype
    return (
        out.astype(numpy_dtype(plan.dtype)).reshape(plan.out_shape),  # rule 11: rounded to the input dtype
        weights.reshape(plan.logits_shape),  # rule 1: the layout of the inputs
        lse.reshape(plan.lse_shape),
    )


@dataclass
class Forward:
    """One forward pass on grouped arrays, in the compute dtype, kept for the backward pass: q
    ``(*B, Hkv, G, L, E)``, k ``(*B, Hkv, S, E)``, v ``(*B, Hkv, S, Ev)``; ``(*B, Hkv, G, L, S)``
    for the rest, lse ``(*B, Hkv, G, L)``."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    capped: np.ndarray | None  # tanh(raw / softcap), with a softcap
    weights: np.ndarray
    dropped: np.ndarray  # weights * multiplier (the weights themselves without a dropout mask)
    multiplier: np.ndarray | None  # keep / (1 - p), with a dropout mask
    lse: np.ndarray


def forward(plan: AttentionPlan, q: Any, k: Any, v: Any, mask: Any, bias: Any, dropout_mask: Any) -> Forward:
    """SPEC.md's forward pass for a validated plan, on q, k, v, mask, bias and dropout_mask as given
    to ``attention`` (None when absent)."""
    compute = np.dtype(plan.compute_dtype)
    q, k, v = grouped_inputs(plan, q, k, v)
    softcap = None if plan.softcap is None else compute.type(plan.softcap)  # rule 10: scalars in the compute dtype
    biased = None if bias is None else grouped_view(plan, bias.astype(compute))  # rule 5: converted exactly
    x, capped = logits(plan, q, k, compute.type(plan.scale), softcap, biased)
    allowed = allowed_keys(plan, x, grouped_view(plan, mask), plan.key_range)
    weights, lse = softmax(x, allowed)
    dropped, multiplier = dropout(weights, grouped_view(plan, dropout_mask), compute.type(plan.dropout_scale))
    return Forward(q, k, v, capped, weights, dropped, multiplier, lse)


def attention_backward(
    plan: AttentionPlan, q: Any, k: Any, v: Any, mask: Any, bias: Any, dropout_mask: Any, d_out: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """``(dq, dk, dv, dbias)``: the gradients of ``sum(out * d_out)``, d_out ``(*B, Hq, L, Ev)``,
    computed analytically in the compute dtype. dq, dk, dv have the shapes and dtype of q, k, v;
    dbias (None without a bias) bias's shape and dtype.

    With P the weights and Z the dropout multiplier (1 without): dV = (P Z)ᵀ dO, dW = Z (dO Vᵀ),
    dS = P (dW - rowsum(P dW)) (= dbias, summed to bias's shape), dR = dS (1 - tanh²) under a
    softcap, dQ = scale dR K, dK = scale dRᵀ Q; dK and dV summed over the query heads of a kv head.
    """
    f = forward(plan, q, k, v, mask, bias, dropout_mask)
    compute = np.dtype(plan.compute_dtype)
    stacked = plan.stacked_shape(plan.kv_len)

    # rule 14: the softmax backward pass, in the compute dtype
    d_out = d_out.astype(compute).reshape(plan.stacked_shape(plan.value_dim))
    dv = np.matmul(np.swapaxes(f.dropped.reshape(stacked), -1, -2), d_out)
    d_weights = np.matmul(d_out, np.swapaxes(f.v, -1, -2)).reshape(plan.grouped_logits_shape)
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
    dq = np.matmul(d_raw, f.k)
    dk = np.matmul(np.swapaxes(d_raw, -1, -2), f.q.reshape(plan.stacked_shape(plan.head_dim)))
    return (
        dq.astype(q.dtype).reshape(q.shape),
        dk.astype(k.dtype).reshape(k.shape),
        dv.astype(v.dtype).reshape(v.shape),
        d_bias,
    )


# ---- the multi-head attention layer (rules 15-18) -------------------------------------------------


def layer_mask(plan: LayerPlan, mask: Any, key_padding_mask: Any) -> np.ndarray | None:
    """The per-head attention's mask: mask (broadcastable to ``(*B, H, L, S)``) and the key padding
    mask ``(*B, S)`` (True = a real token) combined by intersection; None when both are None."""
    if key_padding_mask is None:
        return mask
    padding = np.broadcast_to(key_padding_mask, plan.padding_shape)
    padding = padding.reshape(plan.key_padding_shape)  # rule 16: a key padding mask masks keys
    return padding if mask is None else mask & padding


def project_inputs(plan: LayerPlan, query: Any, key: Any, value: Any,
                   params: MHAParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q ``(*B, H, L, hd)``, k ``(*B, Hkv, S, hd)``, v ``(*B, Hkv, S, hd_v)`` in the compute dtype."""
    compute = np.dtype(plan.compute_dtype)
    projected = []
    for x, w, b in ((query, params.wq, params.bq), (key, params.wk, params.bk), (value, params.wv, params.bv)):
        y = np.einsum("...ld,dhk->...hlk", x.astype(compute), w.astype(compute))  # rule 15, rule 17
        projected.append(y if b is None else y + b.astype(compute)[:, None, :])
    return projected[0], projected[1], projected[2]


def project_output(plan: LayerPlan, o: np.ndarray, params: MHAParams) -> np.ndarray:
    """out ``(*B, L, d_out)`` of the per-head attention's o ``(*B, H, L, hd_v)`` (compute dtype),
    rounded once to the layer's dtype."""
    compute = np.dtype(plan.compute_dtype)
    out = np.einsum("...hlv,hvo->...lo", o, params.wo.astype(compute))  # rule 15
    if params.bo is not None:
        out = out + params.bo.astype(compute)
    return out.astype(numpy_dtype(plan.dtype))  # rule 17: rounded once, at the end


def layer_forward(plan: LayerPlan, query: Any, key: Any, value: Any, params: MHAParams, mask: Any, bias: Any,
                  dropout_mask: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(out, weights, lse)``: out ``(*B, L, d_out)`` in the layer's dtype; per-head weights
    ``(*B, H, L, S)`` (before dropout) and lse ``(*B, H, L)`` in the compute dtype."""
    q, k, v = project_inputs(plan, query, key, value, params)
    f = forward(plan.attention, q, k, v, mask, bias, dropout_mask)  # rule 15: SPEC's attention per head
    o, weights, lse = results(plan.attention, f.dropped, f.v, f.weights, f.lse)
    return project_output(plan, o, params), weights, lse


def _batch_flattened(x: np.ndarray, trailing: int) -> np.ndarray:
    """x with its batch dims (all but the last ``trailing``) flattened into one leading axis."""
    return x.reshape(-1, *x.shape[x.ndim - trailing:])


def layer_backward(plan: LayerPlan, query: Any, key: Any, value: Any, params: MHAParams, mask: Any, bias: Any,
                   dropout_mask: Any, d_out: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, MHAParams, Any]:
    """``(d_query, d_key, d_value, d_params, dbias)`` of ``sum(out * d_out)``, analytically (rule 18):
    the chain rule through the projections around ``attention_backward``, in the compute dtype, each
    gradient rounded once to its array's dtype."""
    compute, attention = np.dtype(plan.compute_dtype), plan.attention
    q, k, v = project_inputs(plan, query, key, value, params)
    f = forward(attention, q, k, v, mask, bias, dropout_mask)
    o = results(attention, f.dropped, f.v, f.weights, f.lse)[0]
    g = d_out.astype(compute)
    batch_axes = tuple(range(len(plan.batch_shape) + 1))  # the batch dims and the sequence axis
    d_o = np.einsum("...lo,hvo->...hlv", g, params.wo.astype(compute))
    d_wo = np.einsum("nhlv,nlo->hvo", _batch_flattened(o, 3), _batch_flattened(g, 2))
    d_bo = None if params.bo is None else g.sum(axis=batch_axes)
    dq, dk, dv, dbias = attention_backward(attention, q, k, v, mask, bias, dropout_mask, d_o)
    d_inputs, d_weights, d_biases = [], [], []
    for x, w, b, dy in ((query, params.wq, params.bq, dq), (key, params.wk, params.bk, dk),
                        (value, params.wv, params.bv, dv)):
        d_inputs.append(np.einsum("...hlk,dhk->...ld", dy, w.astype(compute)).astype(x.dtype))
        d_weights.append(np.einsum("nld,nhlk->dhk", _batch_flattened(x.astype(compute), 2), _batch_flattened(dy, 3)))
        d_biases.append(None if b is None else dy.sum(axis=tuple(range(len(plan.batch_shape))) + (-2,)))
    d_all = (*d_weights, d_wo, *d_biases, d_bo)
    d_params = MHAParams(*(None if d is None else d.astype(p.dtype) for d, p in zip(d_all, params, strict=True)))
    return d_inputs[0], d_inputs[1], d_inputs[2], d_params, dbias


class NumpyBackend(Backend):
    """SPEC.md in NumPy. ``threads``: the blocked algorithm's threads (rule 19; None: every CPU this
    process may run on, ``numpy_blocked.default_threads()``); results do not depend on it."""

    name = "numpy"
    framework = "numpy"
    #: rule 19: chosen by measurement on a 2-core CPU (float32 and float64, L = S = 4096, E = 64).
    default_blocks = (512, 256)

    def __init__(self, *, threads: int | None = None):
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)):
            raise TypeError(f"threads must be a positive int or None, got {threads!r}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        self.threads = threads

    def _attention(
        self, plan: AttentionPlan, q: Any, k: Any, v: Any, mask: Any, bias: Any, dropout_mask: Any
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        # rule 12: the front door (validation.py) has checked every argument before this hook runs
        if plan.blocked:  # rule 19: without the weights, in bounded memory
            out, lse = blocked_forward(plan, q, k, v, mask, bias, dropout_mask, threads=self.threads)
            return out, None, lse
        f = forward(plan, q, k, v, mask, bias, dropout_mask)
        return results(plan, f.dropped, f.v, f.weights, f.lse)

    def _attention_vjp(
        self, plan: AttentionPlan, q: Any, k: Any, v: Any, mask: Any, bias: Any, dropout_mask: Any, d_out: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        # rule 12: the front door (validation.py) has checked every argument, d_out included
        if plan.blocked:  # rule 19: the FlashAttention-2 backward
            return blocked_backward(plan, q, k, v, mask, bias, dropout_mask, d_out, threads=self.threads)
        if plan.score_mod is not None:  # rule 22: its derivative needs automatic differentiation
            raise NotImplementedError("the numpy backend cannot differentiate a score_mod (NumPy has no automatic "
                                      "differentiation); use the jax or torch backend")
        return attention_backward(plan, q, k, v, mask, bias, dropout_mask, d_out)

    def _multi_head_attention(
        self, plan: LayerPlan, query: Any, key: Any, value: Any, params: MHAParams, mask: Any, key_padding_mask: Any,
        bias: Any, dropout_mask: Any,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return layer_forward(plan, query, key, value, params, layer_mask(plan, mask, key_padding_mask), bias,
                             dropout_mask)

    def _multi_head_attention_vjp(
        self, plan: LayerPlan, query: Any, key: Any, value: Any, params: MHAParams, mask: Any, key_padding_mask: Any,
        bias: Any, dropout_mask: Any, d_out: Any,
    ) -> tuple[Any, Any, Any, MHAParams, Any]:
        return layer_backward(plan, query, key, value, params, layer_mask(plan, mask, key_padding_mask), bias,
                              dropout_mask, d_out)

    def asarray(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x)

    def to_numpy(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x)
