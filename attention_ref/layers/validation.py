"""The front door of the multi-head attention layer: ``validate_layer_args`` checks every argument
of ``multi_head_attention`` (SPEC.md rules 12 and 15-17) before any computation and returns its
:class:`LayerPlan`. Like ``validate_attention_args``, it reads only ``.shape`` and ``.dtype``, so the
same bad input raises the same exception type with the same message on every backend.

The per-head attention's own arguments (mask, bias, scale, causal, window, dropout...) are checked by
``validate_attention_args`` itself, on stand-ins of the projected q, k, v (no memory, no compute), so
that its rules and messages apply unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ..broadcasting import is_broadcastable
from ..frameworks import dtype_name, framework_of, numpy_dtype, shape_of
from ..plan import DEFAULT_OPTIONS, FLOATING_DTYPES, AttentionOptions
from ..validation import _check_compute_dtype, _check_devices, _check_frameworks, _fmt, validate_attention_args
from .params import MHAParams
from .plan import LayerPlan

_WEIGHT_SHAPES = {"wq": "(d_q, H, hd)", "wk": "(d_k, Hkv, hd)", "wv": "(d_v, Hkv, hd_v)", "wo": "(H, hd_v, d_out)",
                  "bq": "(H, hd)", "bk": "(Hkv, hd)", "bv": "(Hkv, hd_v)", "bo": "(d_out,)"}


def _stand_in(framework: str, shape: tuple[int, ...], dtype: str, like: Any) -> Any:
    """An array-like of ``shape`` and ``dtype`` in ``framework`` (on like's device) that holds no memory."""
    if framework == "torch":
        import torch

        return torch.zeros((), dtype=getattr(torch, dtype), device=like.device).expand(shape)
    if framework == "jax":
        import jax

        return jax.ShapeDtypeStruct(shape, np.dtype(dtype))
    return np.broadcast_to(np.zeros((), numpy_dtype(dtype)), shape)


def _check_params(params: Any, query_shape: tuple[int, ...], key_shape: tuple[int, ...],
                  value_shape: tuple[int, ...]) -> None:
    if not isinstance(params, MHAParams):
        raise TypeError(f"params must be an attention_ref.layers.MHAParams, got {type(params).__name__}")
    for name in ("wq", "wk", "wv", "wo"):
        if getattr(params, name) is None:
            raise TypeError(f"params.{name} must be an array {_WEIGHT_SHAPES[name]}, got None")
    shapes = {name: shape_of(x) for name, x in params._asdict().items() if x is not None}
    for name, shape in shapes.items():
        rank = 1 if name == "bo" else 2 if name.startswith("b") else 3
        if len(shape) != rank:
            raise ValueError(f"params.{name} must have shape {_WEIGHT_SHAPES[name]}, got {_fmt(shape)}")
    (d_q, heads, head_dim), (d_k, kv_heads, k_head_dim) = shapes["wq"], shapes["wk"]
    (d_v, v_heads, value_dim), (o_heads, o_value_dim, d_out) = shapes["wv"], shapes["wo"]
    listing = ", ".join(f"{name} {_fmt(shape)}" for name, shape in shapes.items())
    expected = {"bq": (heads, head_dim), "bk": (kv_heads, head_dim), "bv": (kv_heads, value_dim), "bo": (d_out,)}
    if k_head_dim != head_dim:
        raise ValueError(f"params.wq and params.wk must have the same head dim hd, got {listing}")
    if v_heads != kv_heads:
        raise ValueError(f"params.wk and params.wv must have the same kv heads Hkv, got {listing}")
    if (o_heads, o_value_dim) != (heads, value_dim):
        raise ValueError(f"params.wo must have shape (H, hd_v, d_out) = ({heads}, {value_dim}, d_out), got {listing}")
    if min(heads, kv_heads, head_dim, value_dim) < 1:
        raise ValueError(f"the layer needs at least one head and head dims >= 1, got {listing}")
    if heads % kv_heads:
        raise ValueError(f"the query heads H={heads} must be a multiple of the kv heads Hkv={kv_heads}, got {listing}")
    for name, shape in expected.items():
        if name in shapes and shapes[name] != shape:
            raise ValueError(f"params.{name} must have shape {_WEIGHT_SHAPES[name]} = {_fmt(shape)}, got {listing}")
    for name, features, got in (("query", d_q, query_shape), ("key", d_k, key_shape), ("value", d_v, value_shape)):
        if got[-1] != features:
            weight = f"w{name[0]}"
            raise ValueError(f"{name} {_fmt(got)} must have {features} features (params.{weight} "
                             f"{_fmt(shapes[weight])})")


def validate_layer_args(
    query: Any,
    key: Any,
    value: Any,
    params: Any,
    options: AttentionOptions = DEFAULT_OPTIONS,
    *,
    key_padding_mask: Any = None,
    return_weights: Any = False,
    return_lse: Any = False,
    compute_dtype: Any = None,
    backend_framework: str | None = None,
) -> LayerPlan:
    """Check every argument of ``multi_head_attention`` and return the plan of the call.

    query ``(*B, L, d_q)``, key ``(*B, S, d_k)``, value ``(*B, S, d_v)`` and every array of params
    share one framework, device and floating dtype; params' shapes agree with each other and with the
    inputs' features; key_padding_mask is boolean (True = a real token) and broadcastable to
    ``(*B, S)``. Raises TypeError for a wrong type or dtype, ValueError for a wrong shape or value.
    """
    arrays = {"query": query, "key": key, "value": value}
    if isinstance(params, MHAParams):
        arrays |= {f"params.{name}": x for name, x in params._asdict().items()}
    framework = _check_frameworks(
        {**arrays, **options.array_keywords(), "key_padding_mask": key_padding_mask}, backend_framework
    )
    dtypes = {name: dtype_name(x) for name, x in arrays.items() if x is not None}
    if dtypes["query"] not in FLOATING_DTYPES:
        raise TypeError(f"query must have a floating dtype ({', '.join(FLOATING_DTYPES)}), got {dtypes['query']}")
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{name} {dt}" for name, dt in dtypes.items())
        raise TypeError(f"query, key, value and params must share one dtype (rule 17), got {listing}")
    dtype = dtypes["query"]

    query_shape, key_shape, value_shape = shape_of(query), shape_of(key), shape_of(value)
    shapes = f"query {_fmt(query_shape)}, key {_fmt(key_shape)}, value {_fmt(value_shape)}"
    if len(query_shape) < 2:
        raise ValueError(f"query must have rank >= 2, (..., L, d_q), got shape {_fmt(query_shape)}")
    if not len(query_shape) == len(key_shape) == len(value_shape):
        raise ValueError(f"query, key and value must have the same rank, got {shapes}")
    batch_shape = query_shape[:-2]
    if key_shape[:-2] != batch_shape or value_shape[:-2] != batch_shape:
        raise ValueError(f"query, key and value must have the same batch dims (all but the last 2), got {shapes}")
    if key_shape[-2] != value_shape[-2]:
        raise ValueError(f"key and value must have the same number of keys S, got {shapes}")
    _check_params(params, query_shape, key_shape, value_shape)
    if key_padding_mask is not None:
        if dtype_name(key_padding_mask) != "bool":
            raise TypeError(
                f"key_padding_mask must be boolean (True = a real token), got {dtype_name(key_padding_mask)}")
        if not is_broadcastable(shape_of(key_padding_mask), (*batch_shape, key_shape[-2])):
            raise ValueError(f"key_padding_mask of shape {_fmt(shape_of(key_padding_mask))} is not broadcastable to "
                             f"(..., S) = {_fmt((*batch_shape, key_shape[-2]))}")
    _check_devices({**arrays, "key_padding_mask": key_padding_mask})

    compute = _check_compute_dtype(compute_dtype, dtype)
    heads, kv_heads = params.num_heads, params.num_kv_heads
    q_len, kv_len = query_shape[-2], key_shape[-2]
    q, k, v = (_stand_in(framework, (*batch_shape, h, n, e), compute, query) for h, n, e in
               ((heads, q_len, params.head_dim), (kv_heads, kv_len, params.head_dim),
                (kv_heads, kv_len, params.value_dim)))
    attention = validate_attention_args(q, k, v, options, return_weights=return_weights, return_lse=return_lse,
                                        dense=True,
                                        compute_dtype=compute, backend_framework=backend_framework)
    if key_padding_mask is not None:
        attention = dataclasses.replace(attention, has_mask=True)
    return LayerPlan(
        attention=attention, dtype=dtype, query_features=query_shape[-1], key_features=key_shape[-1],
        value_features=value_shape[-1], out_features=params.out_features,
        has_biases=tuple(x is not None for x in (params.bq, params.bk, params.bv, params.bo)),  # type: ignore[arg-type]
        has_key_padding_mask=key_padding_mask is not None,
    )


def validate_layer_vjp_args(
    query: Any, key: Any, value: Any, params: Any, d_out: Any, options: AttentionOptions = DEFAULT_OPTIONS, *,
    key_padding_mask: Any = None, compute_dtype: Any = None, backend_framework: str | None = None,
) -> LayerPlan:
    """``validate_layer_args``, then ``d_out``: an array of query's framework, dtype and device, of
    the output's shape ``(*B, L, d_out)``."""
    plan = validate_layer_args(query, key, value, params, options, key_padding_mask=key_padding_mask,
                               compute_dtype=compute_dtype, backend_framework=backend_framework)
    if framework_of(d_out) != plan.attention.framework:
        got = f"a {framework_of(d_out)} array" if framework_of(d_out) else type(d_out).__name__
        raise TypeError(f"d_out must be an array of query's framework, got {got}")
    if dtype_name(d_out) != plan.dtype:
        raise TypeError(f"d_out must have the dtype of query ({plan.dtype}), got {dtype_name(d_out)}")
    if shape_of(d_out) != plan.out_shape:
        raise ValueError(f"d_out must have the output's shape (..., L, d_out) = {_fmt(plan.out_shape)}, "
                         f"got {_fmt(shape_of(d_out))}")
    _check_devices({"query": query, "d_out": d_out})
    return plan
