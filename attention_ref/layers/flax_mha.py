"""flax ``nnx.MultiHeadAttention`` and linen ``MultiHeadDotProductAttention`` <->
:class:`~attention_ref.layers.MHAParams`, exactly.

flax stores the einsum layout itself: ``query.kernel (d_q, H, hd)``, ``key.kernel (d_k, Hkv, hd)``,
``value.kernel (d_v, Hkv, hd)``, ``out.kernel (H, hd, d_out)``, biases ``(H, hd)``, ``(Hkv, hd)``,
``(d_out,)``: the arrays map one to one, unchanged (linen's variables dict: ``{'params': {'query':
{'kernel', 'bias'}, 'key': ..., 'value': ..., 'out': ...}}``).

Importing this module imports no framework; jax and flax are imported by each function.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from ..frameworks import dtype_name
from .conversion import ConversionError, all_or_no_biases, layer_dims, single_dtype, to_framework
from .params import MHAParams

_PROJECTIONS = ("query", "key", "value", "out")


def _x64(dtype: str) -> Any:
    """jax holds float64 arrays only with x64 on: scope it to building them (never switched globally)."""
    import jax

    return jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()


def from_flax(module_or_variables: Any) -> MHAParams:
    """The parameters of a flax ``nnx.MultiHeadAttention`` module (``num_kv_heads`` included) or of a
    linen ``MultiHeadDotProductAttention``'s variables (``{'params': {...}}`` or the inner dict; other
    collections such as ``'cache'`` are ignored), as an MHAParams of jax arrays, exactly (the same
    arrays; numpy arrays in a variables dict are converted exactly).

    Shapes: those of flax itself, listed in the module docstring; biases None with
    ``use_bias=False``. The params describe the layer with its default ``attention_fn``; the call
    options (dropout, ``decode``, the computation ``dtype``) are not parameters and are ignored.

    Rejected with ConversionError: ``normalize_qk=True`` (a LayerNorm of each head's q and k,
    ``query_ln``/``key_ln``, that MHAParams cannot express); a variables dict without the four
    projections; a linen *module* (pass its variables: linen modules hold no weights).
    """
    from flax import nnx

    if isinstance(module_or_variables, nnx.MultiHeadAttention):
        module = module_or_variables
        if module.normalize_qk:
            raise ConversionError(
                "flax nnx.MultiHeadAttention with normalize_qk=True applies a LayerNorm to each head's q and k "
                "(query_ln, key_ln), which MHAParams cannot express; convert a module with normalize_qk=False")
        kernels = [getattr(module, name).kernel[...] for name in _PROJECTIONS]
        biases = [getattr(module, name).bias[...] if module.use_bias else None for name in _PROJECTIONS]
        return MHAParams(*kernels, *biases)
    if isinstance(module_or_variables, Mapping):
        variables = module_or_variables.get("params", module_or_variables)
        extra = sorted(set(variables) - set(_PROJECTIONS))
        if {"query_ln", "key_ln"} & set(extra):
            raise ConversionError(
                "flax linen MultiHeadDotProductAttention variables with query_ln/key_ln come from "
                "normalize_qk=True (a LayerNorm of each head's q and k), which MHAParams cannot express")
        missing = [name for name in _PROJECTIONS if name not in variables]
        if missing or extra:
            raise ConversionError(
                "flax linen MultiHeadDotProductAttention variables must hold exactly 'query', 'key', 'value' and "
                f"'out' (each {{'kernel', 'bias'?}}); missing {missing}, unexpected {extra}")
        kernels = [variables[name]["kernel"] for name in _PROJECTIONS]
        biases = [variables[name].get("bias") for name in _PROJECTIONS]
        with _x64(dtype_name(kernels[0])):
            return MHAParams(*kernels, *biases).map(lambda x: to_framework(x, "jax"))
    try:
        from flax import linen
    except ImportError:  # pragma: no cover - linen ships with flax
        linen = None
    if linen is not None and isinstance(module_or_variables, linen.Module):
        raise TypeError("from_flax takes a linen module's variables (module.init(...) or a checkpoint), not the "
                        "module: linen modules hold no weights")
    raise TypeError("from_flax expects a flax nnx.MultiHeadAttention or a linen variables dict, got "
                    f"{type(module_or_variables).__name__}")


def to_flax(params: MHAParams, *, kind: str = "nnx", rngs: Any = None, dropout_rate: float = 0.0,
            deterministic: bool | None = None, precision: Any = None) -> Any:
    """A flax layer holding ``params`` exactly (the inverse of ``from_flax``): for ``kind="nnx"`` an
    ``nnx.MultiHeadAttention`` (``rngs``: its rngs, which dropout draws from; default
    ``nnx.Rngs(0)``), for ``kind="linen"`` a pair ``(module, variables)`` of a
    ``linen.MultiHeadDotProductAttention`` and its ``{'params': ...}`` (call
    ``module.apply(variables, ...)``). Parameters are jax arrays of the params' dtype
    (``param_dtype``); numpy and torch arrays are converted exactly.

    Settings: ``num_heads = H``, ``qkv_features = H * hd``, ``out_features = d_out``,
    ``use_bias``; nnx also ``in_features = d_q``, ``in_kv_features = d_k``, ``num_kv_heads = Hkv``,
    ``decode=False``. ``dropout_rate``, ``deterministic`` and ``precision`` are passed on. float64
    params are built under a scoped ``jax.enable_x64``; call the layer under it too.

    Rejected with ConversionError (flax cannot hold them): hd_v != hd (one head dim for q, k, v);
    for nnx d_k != d_v (one ``in_kv_features``); for linen Hkv < H (linen has no ``num_kv_heads``); a
    partial set of biases (one ``use_bias``); arrays of different dtypes; an unknown ``kind``.
    """
    if kind not in ("nnx", "linen"):
        raise ConversionError(f"to_flax kind must be 'nnx' or 'linen', got {kind!r}")
    target = "flax nnx.MultiHeadAttention" if kind == "nnx" else "flax linen MultiHeadDotProductAttention"
    dims = layer_dims(params)
    dtype = single_dtype(params, target)
    if dims.value_dim != dims.head_dim:
        raise ConversionError(f"{target} has one head dim for q, k and v (qkv_features // num_heads): it needs "
                              f"hd_v = hd, got hd={dims.head_dim}, hd_v={dims.value_dim}")
    if kind == "nnx" and dims.d_k != dims.d_v:
        raise ConversionError(f"{target} has one in_kv_features for key and value: it needs d_k = d_v, got "
                              f"d_k={dims.d_k}, d_v={dims.d_v} (linen infers them separately: kind='linen')")
    if kind == "linen" and dims.kv_heads != dims.heads:
        raise ConversionError(f"{target} has no num_kv_heads (grouped-query attention): it needs Hkv = H, got "
                              f"H={dims.heads}, Hkv={dims.kv_heads} (nnx has num_kv_heads: kind='nnx')")
    use_bias = all_or_no_biases(params, target)
    import jax.numpy as jnp

    with _x64(dtype):
        p = params.map(lambda x: to_framework(x, "jax"))
        options = dict(num_heads=dims.heads, qkv_features=dims.heads * dims.head_dim, out_features=dims.d_out,
                       use_bias=use_bias, param_dtype=jnp.dtype(dtype), dropout_rate=dropout_rate,
                       deterministic=deterministic, precision=precision, decode=False)
        if kind == "linen":
            from flax import linen

            variables = {"params": {name: {"kernel": w} if b is None else {"kernel": w, "bias": b}
                                    for name, w, b in zip(_PROJECTIONS, p[:4], p[4:], strict=True)}}
            return linen.MultiHeadDotProductAttention(**options), variables
        from flax import nnx

        zeros = nnx.initializers.zeros_init()  # overwritten below; a random init would compile per shape
        module = nnx.MultiHeadAttention(in_features=dims.d_q, num_kv_heads=dims.kv_heads, in_kv_features=dims.d_k,
                                        kernel_init=zeros, bias_init=zeros, rngs=nnx.Rngs(0) if rngs is None else rngs,
                                        **options)
        for name, w, b in zip(_PROJECTIONS, p[:4], p[4:], strict=True):
            getattr(module, name).kernel.set_value(w)
            if b is not None:
                getattr(module, name).bias.set_value(b)
        return module
