"""The JAX backend: SPEC.md in jax.numpy, jitted, on whatever device holds the inputs.

Precision: every matmul runs at ``Precision.HIGHEST`` (true float32 on GPU/TPU, no TF32 or bf16
passes). float64 inputs, and ``compute_dtype="float64"``, run inside a scoped ``jax.enable_x64``;
the global x64 flag is never changed.

Compilation: the computation is jitted once per shape and static options and reused. Small
problems on the CPU (at most ``BUCKET_MAX_LOGITS`` logits after padding) are laid out on the host
as one head per row (batch dims and heads flattened, kv heads repeated per rule 2, inputs widened
exactly to the compute dtype) and padded to a bucket shape (each dim rounded up to a power of two,
at least ``BUCKET_MIN_ROWS`` rows and ``BUCKET_MIN_LENGTH`` for L, S, E and Ev), with the padded keys
excluded and the padded rows, queries and channels cut from the results, so that one compiled
program per compute dtype (and softcap on/off) serves all nearby shapes. Padding is exact: padded
head-dim channels are zeros (they add exact zeros to q·kᵀ), padded keys get weight exactly 0, and
the scale comes from the true E. The output is then rounded to the input dtype on the host
(round-to-nearest-even, as XLA's convert). Larger problems, arrays on accelerators and calls under a jax transformation
(tracers) run the unpadded program.
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

from ..plan import AttentionPlan
from ..broadcasting import reduce_to_shape
from .base import Backend

_HIGHEST = jax.lax.Precision.HIGHEST

#: Padded problems with more logits than this run unpadded.
BUCKET_MAX_LOGITS = 1 << 18
#: Smallest bucket for L, S, E and Ev, and for rows (batch elements times query heads).
BUCKET_MIN_LENGTH = 16
BUCKET_MIN_ROWS = 8


def _grouped_attention(
    q5: jax.Array,
    k5: jax.Array,
    v5: jax.Array,
    mask5: jax.Array | None,
    bias5: jax.Array | None,
    keep5: jax.Array | None,
    scale: jax.Array,
    softcap: jax.Array | None,
    dropout_scale: jax.Array | None,
    key_low: jax.Array | int | None,
    key_high: jax.Array | int | None,
    kv_valid: jax.Array | None,
    *,
    compute_dtype: str,
    out_dtype: str,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """SPEC.md on grouped arrays: q5 ``(B, Hkv, G, L, E)``, k5 ``(B, Hkv, 1, S, E)``,
    v5 ``(B, Hkv, 1, S, Ev)``; mask5, bias5 and keep5 (dropout keep-mask) broadcastable to
    ``(B, Hkv, G, L, S)``.

    Query i may attend key j only if ``key_low <= j - i <= key_high`` (None: unbounded; causal and
    window combined, ``AttentionPlan.key_range``); ``kv_valid`` None means every key is real, else
    keys ``j >= kv_valid`` are padding and excluded. Differentiable: the row max is a constant for
    autodiff (the softmax does not depend on it), so excluded keys get exactly zero gradient.
    """
    compute = jnp.dtype(compute_dtype)
    length, keys = q5.shape[-2], k5.shape[-2]
    q5, k5, v5 = q5.astype(compute), k5.astype(compute), v5.astype(compute)

    logits = jnp.matmul(q5, jnp.swapaxes(k5, -1, -2), precision=_HIGHEST) * scale.astype(compute)
    if softcap is not None:
        cap = softcap.astype(compute)
        logits = cap * jnp.tanh(logits / cap)
    if bias5 is not None:
        logits = logits + bias5.astype(compute)

    allowed = logits != -jnp.inf
    if mask5 is not None:
        allowed = allowed & mask5
    key_index = jnp.arange(keys)
    key_minus_query = key_index - jnp.arange(length)[:, None]
    if key_low is not None:
        allowed = allowed & (key_minus_query >= key_low)
    if key_high is not None:
        allowed = allowed & (key_minus_query <= key_high)
    if kv_valid is not None:
        allowed = allowed & (key_index < kv_valid)

    masked = jnp.where(allowed, logits, -jnp.inf)
    row_max = jax.lax.stop_gradient(jnp.max(masked, axis=-1, keepdims=True, initial=-jnp.inf))
    row_max = jnp.where(row_max == -jnp.inf, 0, row_max)
    unnormalized = jnp.exp(masked - row_max)
    denominator = unnormalized.sum(axis=-1, keepdims=True)
    fully_excluded = denominator == 0
    safe_denominator = jnp.where(fully_excluded, 1, denominator)
    weights = unnormalized / safe_denominator
    lse = jnp.where(fully_excluded, -jnp.inf, row_max + jnp.log(safe_denominator))[..., 0]

    dropped = weights
    if keep5 is not None:
        dropped = weights * jnp.where(keep5, dropout_scale.astype(compute), jnp.zeros((), compute))
    out = jnp.matmul(dropped, v5, precision=_HIGHEST).astype(out_dtype)
    return out, weights, lse


_grouped_attention_jit = jax.jit(_grouped_attention, static_argnames=("compute_dtype", "out_dtype"))


@partial(jax.jit, static_argnames=("compute_dtype", "out_dtype"))
def _grouped_attention_vjp(
    q5: jax.Array, k5: jax.Array, v5: jax.Array, mask5: jax.Array, bias5: jax.Array, keep5: jax.Array,
    scale: jax.Array, softcap: jax.Array | None, dropout_scale: jax.Array, key_low: jax.Array,
    key_high: jax.Array, kv_valid: jax.Array, d_out: jax.Array, *, compute_dtype: str, out_dtype: str,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(dq5, dk5, dv5, dbias5)`` of ``_grouped_attention`` for the cotangent d_out (padded layout)."""

    def forward(q5: jax.Array, k5: jax.Array, v5: jax.Array, bias5: jax.Array) -> jax.Array:
        return _grouped_attention(q5, k5, v5, mask5, bias5, keep5, scale, softcap, dropout_scale, key_low,
                                  key_high, kv_valid, compute_dtype=compute_dtype, out_dtype=out_dtype)[0]

    _, pullback = jax.vjp(forward, q5, k5, v5, bias5)
    return pullback(d_out)


def _direct_forward(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, bias: jax.Array | None,
    dropout_mask: jax.Array | None, scale: jax.Array, softcap: jax.Array | None, dropout_scale: jax.Array,
    plan: AttentionPlan,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The unpadded computation for one plan (its scale, softcap and dropout scale come traced)."""
    lead, hkv, group = plan.batch_shape, plan.num_kv_heads, plan.group_size
    grouped = (*lead, hkv, group, plan.q_len, plan.kv_len)
    q5 = q.reshape(*lead, hkv, group, plan.q_len, plan.head_dim)
    k5 = k.reshape(*lead, hkv, 1, plan.kv_len, plan.head_dim)
    v5 = v.reshape(*lead, hkv, 1, plan.kv_len, plan.value_dim)

    def grouped_view(x: jax.Array | None) -> jax.Array | None:
        return None if x is None else jnp.broadcast_to(x, plan.logits_shape).reshape(grouped)

    if bias is not None:  # widened before the broadcast, so that its gradient is summed in the compute dtype
        bias = bias.astype(plan.compute_dtype)

    low, high = plan.key_range
    out, weights, lse = _grouped_attention(
        q5, k5, v5, grouped_view(mask), grouped_view(bias), grouped_view(dropout_mask), scale, softcap,
        dropout_scale, low, high, None, compute_dtype=plan.compute_dtype, out_dtype=plan.dtype,
    )
    return out.reshape(plan.out_shape), weights.reshape(plan.logits_shape), lse.reshape(plan.lse_shape)


@partial(jax.jit, static_argnames=("plan",))
def _direct_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, bias: jax.Array | None,
    dropout_mask: jax.Array | None, scale: jax.Array, softcap: jax.Array | None, dropout_scale: jax.Array, *,
    plan: AttentionPlan,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """The unpadded program for one plan."""
    out, weights, lse = _direct_forward(q, k, v, mask, bias, dropout_mask, scale, softcap, dropout_scale, plan)
    return out, weights if plan.return_weights else None, lse if plan.return_lse else None


@partial(jax.jit, static_argnames=("plan",))
def _direct_attention_vjp(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, bias: jax.Array | None,
    dropout_mask: jax.Array | None, scale: jax.Array, softcap: jax.Array | None, dropout_scale: jax.Array,
    d_out: jax.Array, *, plan: AttentionPlan,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """jax.vjp of the unpadded program: ``(dq, dk, dv, dbias)``."""

    def forward(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None) -> jax.Array:
        return _direct_forward(q, k, v, mask, bias, dropout_mask, scale, softcap, dropout_scale, plan)[0]

    _, pullback = jax.vjp(forward, q, k, v, bias)
    return pullback(d_out)


def _bucket(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def _pad_to(x: np.ndarray, shape: tuple[int, ...], fill: Any = 0) -> np.ndarray:
    if x.shape == shape:
        return x
    padded = np.full(shape, fill, dtype=x.dtype)
    padded[tuple(slice(0, n) for n in x.shape)] = x
    return padded


class JaxBackend(Backend):
    name = "jax"
    framework = "jax"

    def __init__(self, *, bucket_shapes: bool = True) -> None:
        #: Pad small CPU problems to bucket shapes (see the module docstring).
        self.bucket_shapes = bucket_shapes

    def _attention(
        self, plan: AttentionPlan, q: Any, k: Any, v: Any, mask: Any, bias: Any, dropout_mask: Any
    ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
        with self._precision_scope(plan):
            if self._uses_buckets(plan, (q, k, v, mask, bias, dropout_mask)):
                return self._bucketed(plan, q, k, v, mask, bias, dropout_mask)
            return _direct_attention(q, k, v, mask, bias, dropout_mask, *self._traced_scalars(plan),
                                     plan=self._static_plan(plan))

    def _attention_vjp(
        self, plan: AttentionPlan, q: Any, k: Any, v: Any, mask: Any, bias: Any, dropout_mask: Any, d_out: Any
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
        with self._precision_scope(plan):
            if self._uses_buckets(plan, (q, k, v, mask, bias, dropout_mask, d_out)):
                return self._bucketed(plan, q, k, v, mask, bias, dropout_mask, d_out=d_out)
            return _direct_attention_vjp(q, k, v, mask, bias, dropout_mask, *self._traced_scalars(plan), d_out,
                                         plan=self._static_plan(plan))

    @staticmethod
    def _traced_scalars(plan: AttentionPlan) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """scale, softcap and dropout scale as compute-dtype arrays: traced, not compiled in."""
        compute = np.dtype(plan.compute_dtype)
        softcap = None if plan.softcap is None else np.asarray(plan.softcap, compute)
        return np.asarray(plan.scale, compute), softcap, np.asarray(plan.dropout_scale, compute)

    @staticmethod
    def _static_plan(plan: AttentionPlan) -> AttentionPlan:
        """The plan with its traced values zeroed, so that one program serves them all."""
        return dataclasses.replace(plan, scale=0.0, softcap=None if plan.softcap is None else 0.0, dropout_p=0.0)

    @staticmethod
    def _precision_scope(plan: AttentionPlan) -> contextlib.AbstractContextManager[Any]:
        needs_x64 = plan.compute_dtype == "float64" or plan.dtype == "float64"
        return jax.enable_x64(True) if needs_x64 else contextlib.nullcontext()

    def _uses_buckets(self, plan: AttentionPlan, arrays: tuple[Any, ...]) -> bool:
        if not self.bucket_shapes:
            return False
        for x in arrays:
            if x is None:
                continue
            if isinstance(x, jax.core.Tracer) or any(d.platform != "cpu" for d in x.devices()):
                return False
        rows, length, keys = self._bucket_shape(plan)
        return rows * length * keys <= BUCKET_MAX_LOGITS

    @staticmethod
    def _bucket_shape(plan: AttentionPlan) -> tuple[int, int, int]:
        """``(rows, L, S)`` of the padded problem, rows = ``prod(B) * Hq`` rounded up."""
        rows = math.prod(plan.batch_shape) * plan.num_q_heads
        return (
            _bucket(rows, BUCKET_MIN_ROWS),
            _bucket(plan.q_len, BUCKET_MIN_LENGTH),
            _bucket(plan.kv_len, BUCKET_MIN_LENGTH),
        )

    def _bucketed(
        self, plan: AttentionPlan, q: Any, k: Any, v: Any, mask: Any, bias: Any, dropout_mask: Any,
        d_out: Any = None,
    ) -> tuple[jax.Array, ...]:
        """Pad on the host to ``(rows, L, S)`` buckets, one head per row (kv heads repeated), inputs
        widened to the compute dtype; run the bucket's program; cut and round the results.

        With ``d_out``, run the bucket's vjp instead and return ``(dq, dk, dv, dbias)``: padded
        rows, queries and channels get zero cotangents, padded keys zero weight, so the padding adds
        exact zeros; the gradients of repeated kv heads are summed over their query heads on the
        host in the compute dtype.
        """
        compute = np.dtype(plan.compute_dtype)
        rows = math.prod(plan.batch_shape) * plan.num_q_heads
        length, keys, group = plan.q_len, plan.kv_len, plan.group_size
        rows_b, length_b, keys_b = self._bucket_shape(plan)
        e_b = _bucket(plan.head_dim, BUCKET_MIN_LENGTH)
        ev_b = _bucket(plan.value_dim, BUCKET_MIN_LENGTH)

        def per_head(x: Any, last: int, repeat: int = 1) -> np.ndarray:  # (*B, H, n, last) -> (rows, n, last)
            x = np.asarray(x).astype(compute)
            if repeat != 1:
                x = np.repeat(x, repeat, axis=-3)
            return x.reshape(rows, x.shape[-2], last)

        q3 = _pad_to(per_head(q, plan.head_dim), (rows_b, length_b, e_b))
        k3 = _pad_to(per_head(k, plan.head_dim, group), (rows_b, keys_b, e_b))
        v3 = _pad_to(per_head(v, plan.value_dim, group), (rows_b, keys_b, ev_b))
        per_row = (rows, length, keys)
        padded_logits = (rows_b, length_b, keys_b)

        def per_row_padded(x: Any, default: Any, fill: Any) -> np.ndarray:
            x = np.asarray(default) if x is None else np.asarray(x)
            return _pad_to(np.broadcast_to(x, plan.logits_shape).reshape(per_row), padded_logits, fill)

        mask3 = per_row_padded(mask, np.ones((), bool), False)
        bias3 = per_row_padded(None if bias is None else np.asarray(bias).astype(compute), np.zeros((), compute), 0)
        keep3 = per_row_padded(dropout_mask, np.ones((), bool), False)

        # Bounds that exclude nothing stand in for an unbounded side: -L_b <= j - i <= S_b always holds.
        low, high = plan.key_range
        scale, softcap, dropout_scale = self._traced_scalars(plan)
        device = next(iter(q.devices()))
        arguments = (
            *(jax.device_put(x[None, :, None], device) for x in (q3, k3, v3, mask3, bias3, keep3)),
            scale, softcap, dropout_scale,
            np.asarray(-length_b if low is None else low, np.int32),
            np.asarray(keys_b if high is None else high, np.int32),
            np.asarray(keys, np.int32),
        )
        dtypes = dict(compute_dtype=plan.compute_dtype, out_dtype=plan.compute_dtype)

        def cut(x: jax.Array, shape: tuple[int, ...], final: tuple[int, ...], dtype: Any) -> jax.Array:
            x = np.asarray(x)[0, :, 0][tuple(slice(0, n) for n in shape)]
            return jax.device_put(np.ascontiguousarray(x).reshape(final).astype(dtype), device)

        if d_out is None:
            out, weights, lse = _grouped_attention_jit(*arguments, **dtypes)
            return (
                # The cast to the input dtype rounds to nearest even, as XLA's convert does.
                cut(out, (rows, length, plan.value_dim), plan.out_shape, q.dtype),
                cut(weights, per_row, plan.logits_shape, compute) if plan.return_weights else None,
                cut(lse, per_row[:-1], plan.lse_shape, compute) if plan.return_lse else None,
            )

        d_out3 = _pad_to(per_head(d_out, plan.value_dim), (rows_b, length_b, ev_b))
        dq, dk, dv, dbias = _grouped_attention_vjp(*arguments, jax.device_put(d_out3[None, :, None], device),
                                                   **dtypes)
        kv_heads = (*plan.batch_shape, plan.num_kv_heads, group)

        def summed_over_group(x: jax.Array, last: int, like: Any) -> jax.Array:
            x = np.asarray(x)[0, :rows, 0, :keys, :last].reshape(*kv_heads, keys, last).sum(axis=-3)
            return jax.device_put(x.reshape(like.shape).astype(like.dtype), device)

        d_bias = None
        if bias is not None:
            full = np.asarray(dbias)[0, :rows, 0, :length, :keys].reshape(plan.logits_shape)
            d_bias = jax.device_put(reduce_to_shape(full, bias.shape).astype(bias.dtype), device)
        return (
            cut(dq, (rows, length, plan.head_dim), q.shape, q.dtype),
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
