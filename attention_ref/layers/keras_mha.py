"""Keras 3 ``keras.layers.MultiHeadAttention`` and ``keras.layers.GroupQueryAttention`` (class
``GroupedQueryAttention``) <-> :class:`~attention_ref.layers.MHAParams`, exactly, on any keras
backend (the params are NumPy arrays).

Keras stores the einsum layout itself: ``query/kernel (d_q, H, key_dim)``, ``key/kernel (d_k, Hkv,
key_dim)``, ``value/kernel (d_v, Hkv, value_dim)``, ``attention_output/kernel (H, value_dim, d_out)``,
biases ``(H, key_dim)``, ``(Hkv, key_dim)``, ``(Hkv, value_dim)``, ``(d_out,)``: the arrays map one to
one, unchanged (hd = ``key_dim`` or ``head_dim``, hd_v = ``value_dim`` or ``head_dim``). Mind the
call order of keras: ``layer(query, value, key)``.

Importing this module imports no framework; keras is imported by each function (it reads
``KERAS_BACKEND`` once, at its first import).
"""

from __future__ import annotations

import contextlib
from typing import Any

from .conversion import ConversionError, all_or_no_biases, layer_dims, single_dtype, to_framework, to_numpy
from .params import MHAParams

_DENSES = ("_query_dense", "_key_dense", "_value_dense", "_output_dense")


def _layer_classes() -> tuple[Any, Any]:
    import keras

    return keras.layers.MultiHeadAttention, keras.layers.GroupQueryAttention


def from_keras(layer: Any) -> MHAParams:
    """The parameters of a built keras ``MultiHeadAttention`` or ``GroupQueryAttention`` layer, as an
    MHAParams of NumPy arrays in the variables' dtype (bfloat16 as ml_dtypes.bfloat16), exactly.

    Shapes: those of keras itself, listed in the module docstring; biases None with
    ``use_bias=False``. Under a mixed dtype policy the params are the variables (e.g. float32), not
    the compute dtype. ``dropout`` and ``flash_attention`` are not parameters and are ignored; a
    single ``attention_axes`` axis other than the one before the features attends over that axis:
    move it to -2 for the reference layer.

    Rejected with ConversionError: a layer that is not built (call or ``build`` it first);
    ``use_gate=True`` (a gate projection that multiplies the heads' output, not in MHAParams);
    ``sliding_window`` (a band mask the layer builds itself: pass it as a mask instead); more than
    one ``attention_axes`` axis; a multi-axis ``output_shape``; quantized projections.
    """
    mha_class, gqa_class = _layer_classes()
    if not isinstance(layer, mha_class | gqa_class):
        raise TypeError("from_keras expects a keras.layers.MultiHeadAttention or keras.layers.GroupQueryAttention, "
                        f"got {type(layer).__name__}")
    name = f"keras {type(layer).__name__}"
    if not layer.built:
        raise ConversionError(f"{name} is not built, so it has no weights yet: call it or build it first")
    config = layer.get_config()
    if config.get("use_gate"):
        raise ConversionError(f"{name} with use_gate=True multiplies each head's output by a gate projection, "
                              "which MHAParams has no place for")
    if config.get("sliding_window") is not None:
        raise ConversionError(
            f"{name} with sliding_window={config['sliding_window']} masks keys outside |i - j| < window itself, "
            "which is not a parameter; convert a layer without it and pass that band as the reference's mask")
    axes = config.get("attention_axes")
    if axes is not None and len(axes) != 1:
        raise ConversionError(f"{name} with attention_axes={tuple(axes)} attends over several axes at once; "
                              "MHAParams describes attention over one sequence axis")
    denses = [getattr(layer, attr) for attr in _DENSES]
    for dense in denses:
        if getattr(dense, "quantization_mode", None) is not None:
            raise ConversionError(f"{name} has {dense.quantization_mode}-quantized projections; MHAParams holds "
                                  "float weights only")
    kernels = [to_numpy(dense.kernel.value) for dense in denses]
    if kernels[3].ndim != 3:
        raise ConversionError(f"{name} with a multi-axis output_shape has an output kernel of shape "
                              f"{kernels[3].shape}; MHAParams needs (H, hd_v, d_out)")
    biases = [None if dense.bias is None else to_numpy(dense.bias.value) for dense in denses]
    return MHAParams(*kernels, *biases)


def to_keras(params: MHAParams, *, dropout: float = 0.0) -> Any:
    """A built keras layer holding ``params`` exactly (the inverse of ``from_keras``), with
    ``dtype`` the params' dtype: ``GroupQueryAttention(head_dim=hd, num_query_heads=H,
    num_key_value_heads=Hkv)`` when Hkv < H, else ``MultiHeadAttention(num_heads=H, key_dim=hd,
    value_dim=hd_v, output_shape=d_out)``, both built for query ``(..., d_q)``, value ``(..., d_v)``
    and key ``(..., d_k)``, with ``use_bias`` and ``dropout``. Arrays of any framework are converted
    exactly. On the jax backend float64 layers are built under a scoped ``jax.enable_x64``: call
    them under it too.

    Rejected with ConversionError (keras cannot hold them): for Hkv < H (GroupQueryAttention: one
    ``head_dim``, output width = query width) hd_v != hd or d_out != d_q; a partial set of biases
    (one ``use_bias``); arrays of different dtypes.
    """
    import keras

    dims = layer_dims(params)
    gqa = dims.kv_heads < dims.heads
    target = "keras GroupQueryAttention" if gqa else "keras MultiHeadAttention"
    dtype = single_dtype(params, target)
    if gqa and dims.value_dim != dims.head_dim:
        raise ConversionError(f"{target} (Hkv < H) has one head_dim for q, k and v: it needs hd_v = hd, got "
                              f"hd={dims.head_dim}, hd_v={dims.value_dim}")
    if gqa and dims.d_out != dims.d_q:
        raise ConversionError(f"{target} (Hkv < H) outputs the query's width: it needs d_out = d_q, got "
                              f"d_q={dims.d_q}, d_out={dims.d_out}")
    use_bias = all_or_no_biases(params, target)
    backend = keras.backend.backend()
    framework = {"jax": "jax", "torch": "torch"}.get(backend, "numpy")
    scope: Any = contextlib.nullcontext()
    if backend == "jax" and dtype == "float64":
        import jax

        scope = jax.enable_x64(True)
    with scope:
        # Zeros, overwritten below: a random initializer would compile once per shape and dtype.
        common = dict(dropout=dropout, use_bias=use_bias, dtype=dtype, kernel_initializer="zeros",
                      bias_initializer="zeros")
        if gqa:
            layer = keras.layers.GroupQueryAttention(
                head_dim=dims.head_dim, num_query_heads=dims.heads, num_key_value_heads=dims.kv_heads, **common)
        else:
            layer = keras.layers.MultiHeadAttention(
                num_heads=dims.heads, key_dim=dims.head_dim, value_dim=dims.value_dim, output_shape=dims.d_out,
                **common)
        layer.build((None, None, dims.d_q), (None, None, dims.d_v), (None, None, dims.d_k))
        denses = [getattr(layer, attr) for attr in _DENSES]
        for dense, w, b in zip(denses, params[:4], params[4:], strict=True):
            dense.kernel.assign(to_framework(w, framework))
            if b is not None:
                dense.bias.assign(to_framework(b, framework))
    return layer
