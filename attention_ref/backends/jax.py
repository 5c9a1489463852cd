"""The JAX backend: SPEC.md in jax.numpy, jitted, on whatever device holds the inputs. A blocked plan
(rule 19, the default without ``return_weights``) runs ``jax_blocked``: the online softmax and the
FlashAttention-2 backward, a ``jax.custom_vjp`` (so ``jax.grad`` of ``attention`` uses it), in memory
bounded by the tile. A dense plan (``return_weights`` or ``dense=True``) runs the functions below,
its gradients by ``jax.vjp`` of the jitted forward pass (rule 14).

Shape letters: B... batch dims, Hq query heads, Hkv kv heads, G = Hq // Hkv query heads per kv head,
L queries, S keys, E q/k head dim, Ev value head dim. The steps work on the grouped layout of
``AttentionPlan`` (rule 2): q ``(*B, Hkv, G, L, E)``, k ``(*B, Hkv, S, E)``, v ``(*B, Hkv, S, Ev)``,
logits, mask, bias and dropout mask ``(*B, Hkv, G, L, S)``, lse ``(*B, Hkv, G, L)``.

Dtypes: q, k, v are float16, bfloat16, float32 or float64, converted exactly to the compute dtype
(float32 or float64, rule 10) in which every step runs; out, dq, dk and dv are rounded to the input
dtype (to nearest even), weights and lse stay in the compute dtype, dbias is in bias's dtype. Every
matmul runs at ``Precision.HIGHEST`` (true float32 on GPU/TPU, no TF32 or bf16 passes). float64 inputs,
and ``compute_dtype="float64"``, run inside a scoped ``jax.enable_x64``; the global flag is never
changed.

Compilation: one program per plan (and per ``score_mod``, rule 22, which the plan holds), with its
scale, softcap and dropout scale traced (not compiled in). A plan with a ``score_mod`` runs unpadded.
Small problems on the CPU (at most ``BUCKET_MAX_LOGITS`` logits after padding) run the program of a
padded plan instead (``_bucket_plan``): laid out on the host as one head per row (batch dims and
heads flattened, kv heads repeated per rule 2, inputs widened exactly to the compute dtype), each dim
rounded up to a power of two (at least ``BUCKET_MIN_ROWS`` rows, ``BUCKET_ROWS`` where the padded
problem stays small, and ``BUCKET_MIN_LENGTH`` for L, S, E and Ev), the key bounds of causal and
window traced, so that one program per compute dtype (and softcap on/off, for the dense one) serves
all nearby shapes; a blocked plan's padded program also
traces its blocks and whether it has a softcap, its tile is the whole padded problem, and one program
per bucket serves every block size. Padding is exact: padded head-dim channels are zeros (they
add exact zeros to q·kᵀ), padded keys are excluded (weight exactly 0), the scale comes from the true
E, and padded rows, queries and channels are cut from the results, which are rounded to the input
dtype on the host. Larger problems, arrays on accelerators and calls under a jax transformation
(tracers) run the unpadded program.

The numpy and torch backends have the same steps under the same names: ``grouped_inputs``,
``grouped_view``, ``logits``, ``allowed_keys``, ``softmax``, ``dropout``, ``results``, ``forward``
and ``attention_backward``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..broadcasting import reduce_to_shape
from ..layers.params import MHAParams
from ..layers.plan import LayerPlan
from ..mods import scored
from ..plan import AttentionPlan
from . import jax_blocked
from .base import Backend

_HIGHEST = jax.lax.Precision.HIGHEST

#: Padded problems with more logits than this run unpadded.
BUCKET_MAX_LOGITS = 1 << 18
#: Smallest bucket for L, S, E and Ev, and for rows (batch elements times query heads).
BUCKET_MIN_LENGTH = 16
BUCKET_MIN_ROWS = 8
#: Rows are padded further, up to this many, while the padded problem stays within
#: ``BUCKET_MAX_LOGITS``: fewer programs (small problems of 1 to 64 rows share one), the same problems
#: padded.
BUCKET_ROWS = 64


def grouped_inputs(
    plan: AttentionPlan, q: jax.Array, k: jax.Array, v: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q ``(*B, Hq, L, E)`` as ``(*B, Hkv, G, L, E)``, k as ``(*B, Hkv, S, E)`` and v as
    ``(*B, Hkv, S, Ev)`` (rank-2 inputs gain their one head), in the compute dtype."""
    compute = jnp.dtype(plan.compute_dtype)
    q, k, v = (x.astype(compute) for x in (q, k, v))  # rule 10: exact, every step runs in the compute dtype
    k = k.reshape(plan.kv_shape(plan.head_dim))  # rule 1: heads first, a rank-2 input is one head
    v = v.reshape(plan.kv_shape(plan.value_dim))
    return q.reshape(plan.grouped_shape(plan.head_dim)), k, v  # rule 2: query head h uses kv head h // G


def grouped_view(plan: AttentionPlan, x: jax.Array | None) -> jax.Array | None:
    """A mask, bias or dropout mask broadcastable to ``(*B, Hq, L, S)``, as ``(*B, Hkv, G, L, S)``;
    None stays None."""
    if x is None:
        return None
    return jnp.broadcast_to(x, plan.logits_shape).reshape(plan.grouped_logits_shape)  # rule 2: h // G


def _int32_arange(n: int) -> jax.Array:
    """The index arrays of rule 22's mods: int32, as FlexAttention's."""
    return jnp.arange(n, dtype=jnp.int32)


def logits(
    plan: AttentionPlan, q: jax.Array, k: jax.Array, scale: jax.Array, softcap: jax.Array | None,
    bias: jax.Array | None,
) -> tuple[jax.Array, jax.Array | None]:
    """The logits ``(*B, Hkv, G, L, S)`` of q ``(*B, Hkv, G, L, E)`` and k ``(*B, Hkv, S, E)``:
    scaled, modified by ``plan.score_mod`` (rule 22), capped (softcap None: no cap) and biased (bias
    ``(*B, Hkv, G, L, S)`` or None). scale,
    softcap and bias are in the compute dtype. Also returns ``tanh(raw / softcap)`` (None without a
    softcap), which jax.vjp differentiates."""
    # rule 10: the matmul runs in the compute dtype at HIGHEST precision, k broadcast over G
    raw = jnp.matmul(q, jnp.swapaxes(k, -1, -2)[..., None, :, :], precision=_HIGHEST)
    x = raw.reshape(plan.grouped_logits_shape) * scale  # rule 3
    if plan.score_mod is not None:  # rule 22: on the scaled logits, before the softcap
        modded = jnp.broadcast_to(scored(plan, x, _int32_arange), plan.logits_shape)
        x = modded.reshape(plan.grouped_logits_shape).astype(x.dtype)
    capped = None
    if softcap is not None:
        capped = jnp.tanh(x / softcap)  # rule 4
        x = softcap * capped
    if bias is not None:
        x = x + bias  # rule 5: after the softcap
    return x, capped


def allowed_keys(
    plan: AttentionPlan, x: jax.Array, mask: jax.Array | None, key_range: tuple[Any, Any]
) -> jax.Array:
    """Boolean ``(*B, Hkv, G, L, S)``: the keys each query attends. x the logits, mask
    ``(*B, Hkv, G, L, S)`` or None, ``key_range = (low, high)`` as ``plan.key_range`` (query i may
    attend key j only if ``low <= j - i <= high``; None: unbounded), ints or traced int arrays."""
    allowed = x != -jnp.inf  # rule 8: a -inf logit excludes its key
    if mask is not None:
        allowed = allowed & mask  # rule 6
    low, high = key_range  # rule 7: causal and window, combined by plan.key_range
    key_minus_query = jnp.arange(plan.kv_len) - jnp.arange(plan.q_len)[:, None]
    if low is not None:
        allowed = allowed & (key_minus_query >= low)
    if high is not None:
        allowed = allowed & (key_minus_query <= high)
    return allowed


def softmax(x: jax.Array, allowed: jax.Array) -> tuple[jax.Array, jax.Array]:
    """weights ``(..., L, S)`` and lse ``(..., L)`` of the logits x ``(..., L, S)`` over the allowed
    keys; the row max is a constant for autodiff (the softmax does not depend on it), so excluded keys
    get exactly zero gradient."""
    masked = jnp.where(allowed, x, -jnp.inf)
    row_max = jnp.max(masked, axis=-1, keepdims=True, initial=-jnp.inf)  # rule 9: over attended keys only
    row_max = jax.lax.stop_gradient(row_max)
    row_max = jnp.where(row_max == -jnp.inf, 0, row_max)
    unnormalized = jnp.exp(masked - row_max)  # rule 9: the row max subtracted
    denominator = unnormalized.sum(axis=-1, keepdims=True)
    fully_excluded = denominator == 0  # rule 8: weights 0 and lse -inf
    safe_denominator = jnp.where(fully_excluded, 1, denominator)
    weights = unnormalized / safe_denominator
    lse = jnp.where(fully_excluded, -jnp.inf, row_max + jnp.log(safe_denominator))
    return weights, lse[..., 0]


def dropout(
    weights: jax.Array, keep: jax.Array | None, dropout_scale: jax.Array
) -> tuple[jax.Array, jax.Array | None]:
    """``(dropped, multiplier)``: the weights ``(..., L, S)`` times ``multiplier = keep / (1 - p)``
    (keep broadcastable to them; dropout_scale ``1 / (1 - p)`` in the compute dtype). Without a keep
    mask, the weights themselves and None."""
    if keep is None:
        return weights, None
    multiplier = jnp.where(keep, dropout_scale, jnp.zeros((), weights.dtype))  # rule 13: keep / (1 - p)
    return weights * multiplier, multiplier


def results(
    plan: AttentionPlan, p: jax.Array, v: jax.Array, weights: jax.Array, lse: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(out, weights, lse)`` in the plan's shapes, from the grouped (dropped) probabilities p and
    the weights ``(*B, Hkv, G, L, S)``, v ``(*B, Hkv, S, Ev)`` and lse ``(*B, Hkv, G, L)``: out
    ``(*B, Hq, L, Ev)`` in ``plan.dtype``, weights and lse in the compute dtype."""
    out = jnp.matmul(p, v[..., None, :, :], precision=_HIGHEST)  # rule 11: out = P·V, compute dtype
    return (
        out.astype(plan.dtype).reshape(plan.out_shape),  # rule 11: rounded to plan.dtype
        weights.reshape(plan.logits_shape),  # rule 1: the layout of the inputs
        lse.reshape(plan.lse_shape),
    )


def forward(
    plan: AttentionPlan, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
    bias: jax.Array | None, dropout_mask: jax.Array | None, scale: jax.Array, softcap: jax.Array | None,
    dropout_scale: jax.Array, key_range: tuple[jax.Array, jax.Array] | None = None,
    kv_valid: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """SPEC.md's forward pass for a plan: ``results`` of q, k, v, mask, bias and dropout_mask in the
    plan's shapes (None when absent). Jit-able with the plan static: scale, softcap (None: none) and
    dropout_scale come as arrays (the plan's own are not read), so that one program serves them all.

    ``key_range`` (traced bounds) replaces ``plan.key_range`` when given; ``kv_valid`` None means
    every key is real, else keys ``j >= kv_valid`` are padding and excluded (the padded bucket plan).
    """
    compute = jnp.dtype(plan.compute_dtype)
    q, k, v = grouped_inputs(plan, q, k, v)
    # The bias is widened before the broadcast, so that its gradient is summed in the compute dtype.
    biased = None if bias is None else grouped_view(plan, bias.astype(compute))  # rule 5: converted exactly
    scale = scale.astype(compute)  # rule 10: scalars in the compute dtype
    x, _ = logits(plan, q, k, scale, None if softcap is None else softcap.astype(compute), biased)
    allowed = allowed_keys(plan, x, grouped_view(plan, mask), plan.key_range if key_range is None else key_range)
    if kv_valid is not None:
        allowed = allowed & (jnp.arange(plan.kv_len) < kv_valid)  # padded keys are no keys of the problem
    weights, lse = softmax(x, allowed)
    dropped, _ = dropout(weights, grouped_view(plan, dropout_mask), dropout_scale.astype(compute))
    return results(plan, dropped, v, weights, lse)


def attention_backward(
    plan: AttentionPlan, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
    bias: jax.Array | None, dropout_mask: jax.Array | None, d_out: jax.Array, scale: jax.Array,
    softcap: jax.Array | None, dropout_scale: jax.Array, key_range: tuple[jax.Array, jax.Array] | None = None,
    kv_valid: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """``(dq, dk, dv, dbias)``: the gradients of ``sum(out * d_out)`` (d_out of out's shape) by
    jax.vjp of ``forward`` (the same arguments), in the shapes and dtypes of q, k, v and bias (dbias
    None without a bias)."""

    def out_of(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None) -> jax.Array:
        return forward(plan, q, k, v, mask, bias, dropout_mask, scale, softcap, dropout_scale, key_range,
                       kv_valid)[0]

    _, pullback = jax.vjp(out_of, q, k, v, bias)  # rule 14: jax.vjp of the forward pass
    dq, dk, dv, d_bias = pullback(d_out)
    return dq, dk, dv, d_bias


@partial(jax.jit, static_argnames=("plan",))
def _direct_attention(
    plan: AttentionPlan, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, bias: jax.Array | None,
    dropout_mask: jax.Array | None, scale: jax.Array, softcap: jax.Array | None, dropout_scale: jax.Array,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """The unpadded program of a plan: ``forward``, without the results that were not requested."""
    out, weights, lse = forward(plan, q, k, v, mask, bias, dropout_mask, scale, softcap, dropout_scale)
    return out, weights if plan.return_weights else None, lse if plan.return_lse else None


#: The program of a padded bucket plan: ``forward`` with traced key bounds and kv_valid.
_bucket_attention = jax.jit(forward, static_argnames=("plan",))
#: ``attention_backward``, one program per plan (padded or not).
_attention_backward = jax.jit(attention_backward, static_argnames=("plan",))


# ---- the multi-head attention layer (rules 15-18) -------------------------------------------------


def layer_mask(plan: LayerPlan, mask: jax.Array | None, key_padding_mask: jax.Array | None) -> jax.Array | None:
    """The per-head attention's mask: mask (broadcastable to ``(*B, H, L, S)``) and the key padding
    mask ``(*B, S)`` (True = a real token) combined by intersection; None when both are None."""
    if key_padding_mask is None:
        return mask
    padding = jnp.broadcast_to(key_padding_mask, plan.padding_shape).reshape(plan.key_padding_shape)  # rule 16
    return padding if mask is None else mask & padding


def project_inputs(plan: LayerPlan, query: jax.Array, key: jax.Array, value: jax.Array,
                   params: MHAParams) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q ``(*B, H, L, hd)``, k ``(*B, Hkv, S, hd)``, v ``(*B, Hkv, S, hd_v)`` in the compute dtype."""
    compute = jnp.dtype(plan.compute_dtype)
    projected = []
    for x, w, b in ((query, params.wq, params.bq), (key, params.wk, params.bk), (value, params.wv, params.bv)):
        # rule 15, rule 17: in the compute dtype, at HIGHEST precision
        y = jnp.einsum("...ld,dhk->...hlk", x.astype(compute), w.astype(compute), precision=_HIGHEST)
        projected.append(y if b is None else y + b.astype(compute)[:, None, :])
    return projected[0], projected[1], projected[2]


def project_output(plan: LayerPlan, o: jax.Array, params: MHAParams) -> jax.Array:
    """out ``(*B, L, d_out)`` of the per-head attention's o ``(*B, H, L, hd_v)`` (compute dtype),
    rounded once to the layer's dtype."""
    compute = jnp.dtype(plan.compute_dtype)
    out = jnp.einsum("...hlv,hvo->...lo", o, params.wo.astype(compute), precision=_HIGHEST)  # rule 15
    if params.bo is not None:
        out = out + params.bo.astype(compute)
    return out.astype(plan.dtype)  # rule 17: rounded once, at the end


def layer_forward(
    plan: LayerPlan, query: jax.Array, key: jax.Array, value: jax.Array, params: MHAParams, mask: jax.Array | None,
    bias: jax.Array | None, dropout_mask: jax.Array | None, scale: jax.Array, softcap: jax.Array | None,
    dropout_scale: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(out, weights, lse)``: out ``(*B, L, d_out)`` in the layer's dtype; per-head weights
    ``(*B, H, L, S)`` (before dropout) and lse ``(*B, H, L)`` in the compute dtype. Jit-able with
    the plan static; scale, softcap and dropout_scale as for ``forward``."""
    q, k, v = project_inputs(plan, query, key, value, params)
    o, weights, lse = forward(plan.attention, q, k, v, mask, bias, dropout_mask, scale, softcap,
                              dropout_scale)  # rule 15: SPEC's attention per head
    return project_output(plan, o, params), weights, lse


def layer_backward(
    plan: LayerPlan, query: jax.Array, key: jax.Array, value: jax.Array, params: MHAParams, mask: jax.Array | None,
    bias: jax.Array | None, dropout_mask: jax.Array | None, d_out: jax.Array, scale: jax.Array,
    softcap: jax.Array | None, dropout_scale: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, MHAParams, jax.Array | None]:
    """``(d_query, d_key, d_value, d_params, dbias)`` of ``sum(out * d_out)`` by jax.vjp of
    ``layer_forward`` (rule 18), in the shapes and dtypes of the arrays."""

    def out_of(query: jax.Array, key: jax.Array, value: jax.Array, params: MHAParams,
               bias: jax.Array | None) -> jax.Array:
        return layer_forward(plan, query, key, value, params, mask, bias, dropout_mask, scale, softcap,
                             dropout_scale)[0]

    _, pullback = jax.vjp(out_of, query, key, value, params, bias)  # rule 18: jax.vjp of the layer
    d_query, d_key, d_value, d_params, d_bias = pullback(d_out)
    return d_query, d_key, d_value, d_params, d_bias


_layer_forward = jax.jit(layer_forward, static_argnames=("plan",))
_layer_backward = jax.jit(layer_backward, static_argnames=("plan",))


def _bucket(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def _bucket_block(block: int | None, length: int, padded: int) -> int:
    """A blocked plan's block on a dim of ``length`` padded to ``padded``: a block covering the dim
    stays one block (the whole padded dim), a smaller one keeps its size."""
    return padded if block is None or block >= length else block


def _bucket_plan(plan: AttentionPlan) -> AttentionPlan:
    """The padded problem of a plan: ``rows_b`` single heads (``prod(B) * Hq`` rounded up, one head per
    row, no batch dims, Hkv = Hq), L, S, E and Ev rounded up, computed and returned in the compute
    dtype, with a mask, a bias and a dropout mask (all-allowing where the call has none). Its scale,
    softcap, dropout scale and key bounds are traced; everything else is the same for all plans of
    the bucket, so that they share one program. A dense plan's bucket returns weights and lse; a
    blocked plan's (rule 19) returns lse, and its static tile is the whole padded problem, in which
    the plan's blocks are traced (``_bucket_geometry``): one program serves every block size."""
    q_len, kv_len = _bucket(plan.q_len, BUCKET_MIN_LENGTH), _bucket(plan.kv_len, BUCKET_MIN_LENGTH)
    rows = max(_bucket(plan.num_rows, BUCKET_MIN_ROWS), min(BUCKET_ROWS, BUCKET_MAX_LOGITS // (q_len * kv_len)))
    return AttentionPlan(
        framework=plan.framework, batch_shape=(), has_head_axis=True, num_q_heads=rows, num_kv_heads=rows,
        q_len=q_len, kv_len=kv_len,
        head_dim=_bucket(plan.head_dim, BUCKET_MIN_LENGTH), value_dim=_bucket(plan.value_dim, BUCKET_MIN_LENGTH),
        dtype=plan.compute_dtype, compute_dtype=plan.compute_dtype, scale=0.0,
        softcap=0.0 if plan.blocked or plan.softcap is not None else None, causal=False, alignment="top_left",
        has_mask=True, has_bias=True, return_weights=not plan.blocked, return_lse=True, has_dropout_mask=True,
        block_q=q_len if plan.blocked else None, block_k=kv_len if plan.blocked else None,
    )


def _bucket_geometry(plan: AttentionPlan, bucket: AttentionPlan, key_range: tuple[np.ndarray, np.ndarray],
                     kv_valid: np.ndarray) -> jax_blocked.Geometry:
    """The traced blocks, bounds and softcap switch of a blocked plan's padded problem: one program
    per bucket serves every block size, with and without a softcap."""
    block_q = _bucket_block(plan.block_q, plan.q_len, bucket.q_len)
    block_k = _bucket_block(plan.block_k, plan.kv_len, bucket.kv_len)
    return jax_blocked.Geometry(np.asarray(block_q, np.int32), np.asarray(block_k, np.int32), *key_range,
                                np.asarray(plan.q_len, np.int32), kv_valid, np.asarray(plan.softcap is not None))


def _bucket_softcap(plan: AttentionPlan, softcap: np.ndarray | None) -> np.ndarray:
    """The traced softcap of a blocked plan's bucket: the call's, or a dummy 1 (``Geometry.softcap_on``
    is False then), so that calls with and without a softcap share a program."""
    return np.asarray(1, plan.compute_dtype) if softcap is None else softcap


def _pad_to(x: np.ndarray, shape: tuple[int, ...], fill: Any = 0) -> np.ndarray:
    if x.shape == shape:
        return x
    padded = np.full(shape, fill, dtype=x.dtype)
    padded[tuple(slice(0, n) for n in x.shape)] = x
    return padded


class JaxBackend(Backend):
    name = "jax"
    framework = "jax"
    #: rule 19's tile when a call names none, chosen by measurement on a 2-core CPU: at (1, 8, 4096, 4096,
    #: 64), tiles of 256 x 512 ... 1024 x 1024 were within 5-10% of one another forward; 512 x 1024 was
    #: the fastest backward (float32 and float64) and for one float64 head, 512 x 512 about 10% faster
    #: causal (finer skipping). Below 256 x 512 XLA's CPU matmuls slow down by up to 2x.
    default_blocks = (512, 1024)

    def __init__(self, *, bucket_shapes: bool = True) -> None:
        #: Pad small CPU problems to bucket shapes (see the module docstring).
        self.bucket_shapes = bucket_shapes

    def _attention(
        self, plan: AttentionPlan, q: Any, k: Any, v: Any, mask: Any, bias: Any, dropout_mask: Any
    ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
        # rule 12: the front door (validation.py) has checked every argument before this hook runs
        with self._precision_scope(plan):  # rule 10: float64 inside a scoped jax.enable_x64
            if self._uses_buckets(plan, (q, k, v, mask, bias, dropout_mask)):
                return self._bucketed(plan, q, k, v, mask, bias, dropout_mask)
            if plan.blocked:  # rule 19: the online softmax, tile by tile (a custom_vjp for jax.grad)
                out, lse = jax_blocked.blocked_attention_jit(
                    self._static_plan(plan), jax_blocked.heads_per_step(plan, (q, k, v)), q, k, v, mask, bias,
                    dropout_mask, *self._traced_scalars(plan))
                return out, None, lse if plan.return_lse else None
            return _direct_attention(self._static_plan(plan), q, k, v, mask, bias, dropout_mask,
                                     *self._traced_scalars(plan))

    def _attention_vjp(
        self, plan: AttentionPlan, q: Any, k: Any, v: Any, mask: Any, bias: Any, dropout_mask: Any, d_out: Any
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
        # rule 12: the front door (validation.py) has checked every argument, d_out included
        with self._precision_scope(plan):  # rule 10: float64 inside a scoped jax.enable_x64
            if self._uses_buckets(plan, (q, k, v, mask, bias, dropout_mask, d_out)):
                return self._bucketed_vjp(plan, q, k, v, mask, bias, dropout_mask, d_out)
            if plan.blocked:  # rule 19: the FlashAttention-2 backward
                return jax_blocked.blocked_vjp_jit(
                    self._static_plan(plan), jax_blocked.heads_per_step(plan, (q, k, v)), q, k, v, mask, bias,
                    dropout_mask, d_out, *self._traced_scalars(plan))
            return _attention_backward(self._static_plan(plan), q, k, v, mask, bias, dropout_mask, d_out,
                                       *self._traced_scalars(plan))

    def _multi_head_attention(
        self, plan: LayerPlan, query: Any, key: Any, value: Any, params: MHAParams, mask: Any, key_padding_mask: Any,
        bias: Any, dropout_mask: Any,
    ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
        static = dataclasses.replace(plan, attention=self._static_plan(plan.attention))
        with self._precision_scope(plan.attention):  # rule 10: float64 inside a scoped jax.enable_x64
            out, weights, lse = _layer_forward(static, query, key, value, params,
                                               layer_mask(plan, mask, key_padding_mask), bias, dropout_mask,
                                               *self._traced_scalars(plan.attention))
        return out, weights if plan.attention.return_weights else None, lse if plan.attention.return_lse else None

    def _multi_head_attention_vjp(
        self, plan: LayerPlan, query: Any, key: Any, value: Any, params: MHAParams, mask: Any, key_padding_mask: Any,
        bias: Any, dropout_mask: Any, d_out: Any,
    ) -> tuple[Any, Any, Any, MHAParams, Any]:
        static = dataclasses.replace(plan, attention=self._static_plan(plan.attention))
        with self._precision_scope(plan.attention):  # rule 10: float64 inside a scoped jax.enable_x64
            return _layer_backward(static, query, key, value, params, layer_mask(plan, mask, key_padding_mask), bias,
                                   dropout_mask, d_out, *self._traced_scalars(plan.attention))

    @staticmethod
    def _traced_scalars(plan: AttentionPlan) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """scale, softcap and dropout scale as compute-dtype arrays: traced, not compiled in."""
        compute = np.dtype(plan.compute_dtype)
        softcap = None if plan.softcap is None else np.asarray(plan.softcap, compute)  # rule 10: rounded once
        return np.asarray(plan.scale, compute), softcap, np.asarray(plan.dropout_scale, compute)

    @staticmethod
    def _static_plan(plan: AttentionPlan) -> AttentionPlan:
        """The plan with its traced values zeroed, so that one program serves them all."""
        return dataclasses.replace(plan, scale=0.0, softcap=None if plan.softcap is None else 0.0, dropout_p=0.0)

    @staticmethod
    def _precision_scope(plan: AttentionPlan) -> contextlib.AbstractContextManager[Any]:
        """rule 10: float64 is computed inside a scoped ``jax.enable_x64``, the global flag untouched."""
        return jax_blocked.precision_scope(plan)

    def _uses_buckets(self, plan: AttentionPlan, arrays: tuple[Any, ...]) -> bool:
        if not self.bucket_shapes or plan.score_mod is not None:  # rule 22: a mod sees the true indices
            return False
        for x in arrays:
            if x is None:
                continue
            if isinstance(x, jax.core.Tracer) or any(d.platform != "cpu" for d in x.devices()):
                return False
        return math.prod(_bucket_plan(plan).logits_shape) <= BUCKET_MAX_LOGITS

    def _bucket_arguments(
        self, plan: AttentionPlan, bucket: AttentionPlan, q: Any, k: Any, v: Any, mask: Any, bias: Any,
        dropout_mask: Any,
    ) -> tuple[Any, ...]:
        """The arguments of the bucket's program after its plan: q, k, v, mask, bias and dropout mask
        padded on the host to the bucket's shapes, one head per row (kv heads repeated), widened to the
        compute dtype; the traced scalars, the key range and kv_valid."""
        compute = np.dtype(plan.compute_dtype)
        device = next(iter(q.devices()))

        def per_row(x: Any, last: int, repeat: int = 1) -> np.ndarray:  # (*B, H, n, last) -> (rows, n, last)
            x = np.asarray(x).astype(compute)  # rule 10: widened exactly
            if repeat != 1:
                x = np.repeat(x, repeat, axis=-3)  # rule 2: kv heads repeated, repeat_interleave order
            return x.reshape(plan.rows_shape(x.shape[-2], last))

        def per_row_padded(x: Any, default: Any, fill: Any) -> np.ndarray:
            x = np.asarray(default) if x is None else np.asarray(x)
            return _pad_to(np.broadcast_to(x, plan.logits_shape).reshape(plan.rows_shape(plan.q_len, plan.kv_len)),
                           bucket.logits_shape, fill)

        arrays = (
            _pad_to(per_row(q, plan.head_dim), bucket.rows_shape(bucket.q_len, bucket.head_dim)),
            _pad_to(per_row(k, plan.head_dim, plan.group_size), bucket.kv_shape(bucket.head_dim)),
            _pad_to(per_row(v, plan.value_dim, plan.group_size), bucket.kv_shape(bucket.value_dim)),
            per_row_padded(mask, np.ones((), bool), False),
            per_row_padded(None if bias is None else np.asarray(bias).astype(compute), np.zeros((), compute), 0),
            per_row_padded(dropout_mask, np.ones((), bool), False),
        )
        # Bounds that exclude nothing stand in for an unbounded side: -L_b <= j - i <= S_b always holds.
        low, high = plan.key_range
        key_range = (np.asarray(-bucket.q_len if low is None else low, np.int32),
                     np.asarray(bucket.kv_len if high is None else high, np.int32))
        return (*(jax.device_put(x, device) for x in arrays), *self._traced_scalars(plan), key_range,
                np.asarray(plan.kv_len, np.int32))

    def _bucketed(
        self, plan: AttentionPlan, q: Any, k: Any, v: Any, mask: Any, bias: Any, dropout_mask: Any
    ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
        """Run the bucket's program on the padded inputs (``_bucket_arguments``); cut and round the
        results."""
        bucket = _bucket_plan(plan)
        q_b, k_b, v_b, mask_b, bias_b, keep_b, scale, softcap, dropout_scale, key_range, kv_valid = (
            self._bucket_arguments(plan, bucket, q, k, v, mask, bias, dropout_mask))
        if plan.blocked:  # rule 19: the bucket's program runs the blocked algorithm
            weights = None
            out, lse = jax_blocked.bucket_forward_jit(bucket, None, q_b, k_b, v_b, mask_b, bias_b, keep_b, scale,
                                                      _bucket_softcap(plan, softcap), dropout_scale,
                                                      _bucket_geometry(plan, bucket, key_range, kv_valid))
        else:
            out, weights, lse = _bucket_attention(bucket, q_b, k_b, v_b, mask_b, bias_b, keep_b, scale, softcap,
                                                  dropout_scale, key_range, kv_valid)
        device = next(iter(q.devices()))
        return (
            # The cast to the input dtype rounds to nearest even, as XLA's convert does.
            _cut(out, plan.rows_shape(plan.q_len, plan.value_dim), plan.out_shape, q.dtype, device),
            _cut(weights, plan.rows_shape(plan.q_len, plan.kv_len), plan.logits_shape, plan.compute_dtype, device)
            if plan.return_weights else None,
            _cut(lse, plan.rows_shape(plan.q_len), plan.lse_shape, plan.compute_dtype, device)
            if plan.return_lse else None,
        )

    def _bucketed_vjp(
        self, plan: AttentionPlan, q: Any, k: Any, v: Any, mask: Any, bias: Any, dropout_mask: Any, d_out: Any
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
        """Run the bucket's ``attention_backward`` and return ``(dq, dk, dv, dbias)``: padded rows,
        queries and channels get zero cotangents, padded keys zero weight, so the padding adds exact
        zeros; the gradients of repeated kv heads are summed over their query heads on the host in the
        compute dtype."""
        bucket = _bucket_plan(plan)
        q_b, k_b, v_b, mask_b, bias_b, keep_b, scale, softcap, dropout_scale, key_range, kv_valid = (
            self._bucket_arguments(plan, bucket, q, k, v, mask, bias, dropout_mask))
        compute = np.dtype(plan.compute_dtype)
        device = next(iter(q.devices()))
        d_out_rows = np.asarray(d_out).astype(compute).reshape(plan.rows_shape(plan.q_len, plan.value_dim))
        d_out_b = jax.device_put(_pad_to(d_out_rows, bucket.out_shape), device)
        if plan.blocked:  # rule 19: the FlashAttention-2 backward on the padded problem
            dq, dk, dv, dbias = jax_blocked.bucket_vjp_jit(
                bucket, None, q_b, k_b, v_b, mask_b, bias_b, keep_b, d_out_b, scale, _bucket_softcap(plan, softcap),
                dropout_scale, _bucket_geometry(plan, bucket, key_range, kv_valid))
        else:
            dq, dk, dv, dbias = _attention_backward(bucket, q_b, k_b, v_b, mask_b, bias_b, keep_b, d_out_b, scale,
                                                    softcap, dropout_scale, key_range, kv_valid)

        def summed_over_group(x: jax.Array, last: int, like: Any) -> jax.Array:
            per_head = np.asarray(x)[: plan.num_rows, : plan.kv_len, :last].reshape(plan.grouped_kv_shape(last))
            summed = per_head.sum(axis=-3)  # rule 2: dk, dv summed over the query heads of each kv head
            return jax.device_put(summed.reshape(like.shape).astype(like.dtype), device)

        d_bias = None
        if bias is not None:
            full = np.asarray(dbias)[: plan.num_rows, : plan.q_len, : plan.kv_len].reshape(plan.logits_shape)
            d_bias = jax.device_put(reduce_to_shape(full, bias.shape).astype(bias.dtype), device)
        return (
            _cut(dq, plan.rows_shape(plan.q_len, plan.head_dim), q.shape, q.dtype, device),
            summed_over_group(dk, plan.head_dim, k),
            summed_over_group(dv, plan.value_dim, v),
            d_bias,
        )

    def asarray(self, x: np.ndarray) -> jax.Array:
        # device_put, unlike jnp.asarray, compiles nothing for a new shape.
        with jax.enable_x64(True) if x.dtype == np.float64 else contextlib.nullcontext():
            return jax.device_put(np.asarray(x))

    def to_numpy(self, x: jax.Array) -> np.ndarray:
        return np.asarray(x)


def _cut(x: jax.Array, shape: tuple[int, ...], final: tuple[int, ...], dtype: Any, device: Any) -> jax.Array:
    """The ``shape`` corner of a padded result, reshaped to ``final`` and cast to dtype on the host."""
    cut = np.asarray(x)[tuple(slice(0, n) for n in shape)]
    return jax.device_put(np.ascontiguousarray(cut).reshape(final).astype(dtype), device)
