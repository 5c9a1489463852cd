"""What the layer converters share: :class:`ConversionError`, the dimensions of an
:class:`~attention_ref.layers.MHAParams` (checked once, for every converter), the bias and dtype
rules a target imposes, and exact array moves between frameworks (dtype kept, bfloat16 included).

Imports no framework: an array's framework is read from its type, and the backend that converts it
is loaded only when an array of that framework is converted.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ..frameworks import dtype_name, framework_of, shape_of
from .params import MHAParams


class ConversionError(ValueError):
    """A layer, or parameters, that the target cannot represent exactly. Converters never
    approximate: the message names the framework and what it cannot hold."""


class LayerDims(NamedTuple):
    """The sizes of one layer, read from its parameters (SPEC.md "The multi-head attention layer")."""

    d_q: int
    d_k: int
    d_v: int
    d_out: int
    heads: int  # H
    kv_heads: int  # Hkv
    head_dim: int  # hd
    value_dim: int  # hd_v


_SHAPES = {"wq": "(d_q, H, hd)", "wk": "(d_k, Hkv, hd)", "wv": "(d_v, Hkv, hd_v)", "wo": "(H, hd_v, d_out)",
           "bq": "(H, hd)", "bk": "(Hkv, hd)", "bv": "(Hkv, hd_v)", "bo": "(d_out,)"}


def layer_dims(params: Any) -> LayerDims:
    """The dimensions of ``params``, after checking that its shapes agree with each other (TypeError
    for something that is not an MHAParams of arrays, ValueError for inconsistent shapes)."""
    if not isinstance(params, MHAParams):
        raise TypeError(f"params must be an attention_ref.layers.MHAParams, got {type(params).__name__}")
    shapes: dict[str, tuple[int, ...]] = {}
    for name, x in params._asdict().items():
        if x is None:
            if name.startswith("w"):
                raise TypeError(f"params.{name} must be an array {_SHAPES[name]}, got None")
            continue
        if framework_of(x) is None:
            raise TypeError(f"params.{name} must be a numpy, jax or torch array, got {type(x).__name__}")
        shapes[name] = shape_of(x)
    listing = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
    for name, shape in shapes.items():
        if len(shape) != (1 if name == "bo" else 2 if name.startswith("b") else 3):
            raise ValueError(f"params.{name} must have shape {_SHAPES[name]}, got {listing}")
    (d_q, heads, head_dim), (d_k, kv_heads) = shapes["wq"], shapes["wk"][:2]
    d_v, value_dim, d_out = shapes["wv"][0], shapes["wv"][2], shapes["wo"][2]
    expected = {"wk": (d_k, kv_heads, head_dim), "wv": (d_v, kv_heads, value_dim), "wo": (heads, value_dim, d_out),
                "bq": (heads, head_dim), "bk": (kv_heads, head_dim), "bv": (kv_heads, value_dim), "bo": (d_out,)}
    for name, shape in expected.items():
        if name in shapes and shapes[name] != shape:
            raise ValueError(f"params.{name} must have shape {_SHAPES[name]} = {shape}, got {listing}")
    if min(heads, kv_heads) < 1 or heads % kv_heads:
        raise ValueError(f"the query heads H must be a positive multiple of the kv heads Hkv, got {listing}")
    return LayerDims(d_q, d_k, d_v, d_out, heads, kv_heads, head_dim, value_dim)


def has_biases(params: MHAParams) -> tuple[bool, bool, bool, bool]:
    """Which of ``(bq, bk, bv, bo)`` are present."""
    return (params.bq is not None, params.bk is not None, params.bv is not None, params.bo is not None)


def all_or_no_biases(params: MHAParams, target: str) -> bool:
    """True when every bias is present, False when none is; ConversionError for a partial set, which
    ``target`` (one ``use_bias``/``bias`` flag for all four projections) cannot hold."""
    present = has_biases(params)
    if any(present) and not all(present):
        names = ", ".join(f"b{p}={'array' if h else 'None'}" for p, h in zip("qkvo", present, strict=True))
        raise ConversionError(
            f"{target} has one bias flag for all four projections, so its biases are all present or all absent; "
            f"got {names}. Zero biases are not added silently: pass params._replace(b?=zeros) explicitly if "
            "that layer is what you want")
    return all(present)


def single_dtype(params: MHAParams, target: str) -> str:
    """The one dtype name of every array of ``params``; ConversionError when they differ, since a
    ``target`` layer holds its parameters in one dtype."""
    dtypes = {name: dtype_name(x) for name, x in params._asdict().items() if x is not None}
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{name} {dt}" for name, dt in dtypes.items())
        raise ConversionError(f"{target} holds its parameters in one dtype, got {listing}")
    return dtypes["wq"]


def to_numpy(x: Any) -> np.ndarray:
    """A numpy, jax or torch array as NumPy, with its dtype (bfloat16 as ml_dtypes.bfloat16) and
    values exactly (torch tensors are detached and moved to the CPU)."""
    framework = framework_of(x)
    if framework is None:
        raise TypeError(f"expected a numpy, jax or torch array, got {type(x).__name__}")
    if framework == "numpy":
        return x
    from ..registry import get_backend

    return get_backend(framework).to_numpy(x)


def to_framework(x: Any, framework: str, *, device: Any = None) -> Any:
    """``x`` (an array of any framework) as an array of ``framework`` with its dtype and values
    exactly; torch tensors on ``device`` (default: a torch tensor's own device, else the CPU), jax
    arrays on the default device. Arrays already of ``framework`` (and on ``device``) are returned as
    they are; None stays None."""
    if x is None:
        return None
    if framework_of(x) == framework:
        if framework == "torch" and device is not None and x.device != device:
            return x.to(device)
        return x
    from ..registry import get_backend

    converted = get_backend(framework).asarray(to_numpy(x))
    return converted.to(device) if framework == "torch" and device is not None else converted
