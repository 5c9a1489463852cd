"""Hugging Face Llama-style attention (``LlamaAttention``, ``Qwen2Attention`` and their kin: ``q_proj``,
``k_proj``, ``v_proj``, ``o_proj`` Linear layers) <-> :class:`~attention_ref.layers.MHAParams`, exactly.

HF stores ``(out, in)`` matrices applied as ``x @ W.T + b``, feature ``h * hd + d`` being head ``h``;
with D = ``hidden_size``, H = ``num_attention_heads``, Hkv = ``num_key_value_heads``, hd = ``head_dim``
(which need not be D // H):

* ``wq = q_proj.weight.T.reshape(D, H, hd)``, ``wk``/``wv = k/v_proj.weight.T.reshape(D, Hkv, hd)``,
  ``wo = o_proj.weight.T.reshape(H, hd, D)``; ``bq = q_proj.bias.reshape(H, hd)`` etc., None where the
  Linear has no bias (Qwen2: q, k, v biases, none on o).

**RoPE is not a parameter.** The layer applies rotary position embeddings to q and k inside its
forward; MHAParams describes the layer with identity position embeddings, ``cos = 1, sin = 0``
(``position_embeddings=(ones, zeros)`` of shape ``(B, L, hd)``), which is what a comparison with the
reference layer must pass. Scores are ``q @ k.T * head_dim ** -0.5`` (the reference's default
scale); the 4-D ``attention_mask`` the layer receives is additive (eager) and goes in as a bias.

Importing this module imports no framework; torch and transformers are imported by each function.
"""

from __future__ import annotations

from typing import Any

from .conversion import ConversionError, has_biases, layer_dims, single_dtype, to_framework
from .params import MHAParams

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def from_hf(module: Any) -> MHAParams:
    """The parameters of a Llama-style HF attention module, as an MHAParams of detached torch tensors
    (contiguous copies in the module's dtype and device), exactly; see the module docstring for the
    mapping and for RoPE (identity position embeddings, cos = 1, sin = 0).

    Needs ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (``torch.nn.Linear``), ``head_dim`` and a
    ``config`` with ``num_attention_heads`` and ``num_key_value_heads``. Any bias pattern converts
    (each missing bias is None). Shapes: ``wq (D, H, hd)``, ``wk``/``wv (D, Hkv, hd)``, ``wo (H, hd,
    D)``.

    Rejected with ConversionError: a module whose attention is not the reference's with identity
    RoPE: ``q_norm``/``k_norm`` (Qwen3, Gemma3: a norm of each head's q and k), a ``scaling`` other
    than ``head_dim ** -0.5`` (Gemma2's ``query_pre_attn_scalar``), logit soft-capping
    (``config.attn_logit_softcapping``), a ``sliding_window`` layer; and projections whose shapes do
    not match the config's heads.
    """
    import torch

    name = f"HF {type(module).__name__}"
    missing = [p for p in _PROJECTIONS if not isinstance(getattr(module, p, None), torch.nn.Linear)]
    if missing or not hasattr(module, "config") or not hasattr(module, "head_dim"):
        raise TypeError(f"from_hf expects a Llama-style HF attention module (q_proj, k_proj, v_proj, o_proj "
                        f"nn.Linear, head_dim, config), got {type(module).__name__} (missing or not Linear: "
                        f"{missing or 'config/head_dim'})")
    config, head_dim = module.config, int(module.head_dim)
    for norm in ("q_norm", "k_norm"):
        if getattr(module, norm, None) is not None:
            raise ConversionError(f"{name} has {norm}, a norm of each head's q or k, which MHAParams cannot express")
    scaling = getattr(module, "scaling", head_dim**-0.5)
    if scaling != head_dim**-0.5:
        raise ConversionError(f"{name} scales scores by {scaling}, not head_dim ** -0.5 = {head_dim**-0.5}; "
                              "MHAParams describes the default scale (pass scale= to the reference yourself)")
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise ConversionError(f"{name} soft-caps its logits (attn_logit_softcapping="
                              f"{config.attn_logit_softcapping}), which is not a parameter")
    if getattr(module, "sliding_window", None) is not None:
        raise ConversionError(f"{name} is a sliding-window layer (sliding_window={module.sliding_window}), a mask "
                              "it builds itself; convert a full-attention layer and pass the window as a mask")
    heads, kv_heads = int(config.num_attention_heads), int(config.num_key_value_heads)
    q, k, v, o = (getattr(module, p) for p in _PROJECTIONS)
    hidden = q.in_features
    expected = {"q_proj": (heads * head_dim, hidden), "k_proj": (kv_heads * head_dim, hidden),
                "v_proj": (kv_heads * head_dim, hidden), "o_proj": (hidden, heads * head_dim)}
    got = {p: tuple(getattr(module, p).weight.shape) for p in _PROJECTIONS}
    if got != expected:
        raise ConversionError(f"{name}'s projections do not match H={heads}, Hkv={kv_heads}, head_dim={head_dim}: "
                              f"expected weights {expected}, got {got}")

    def owned(x: Any, *shape: int) -> Any:
        return x.detach().reshape(*shape).clone(memory_format=torch.contiguous_format)

    return MHAParams(
        owned(q.weight.T, hidden, heads, head_dim), owned(k.weight.T, hidden, kv_heads, head_dim),
        owned(v.weight.T, hidden, kv_heads, head_dim), owned(o.weight.T, heads, head_dim, hidden),
        None if q.bias is None else owned(q.bias, heads, head_dim),
        None if k.bias is None else owned(k.bias, kv_heads, head_dim),
        None if v.bias is None else owned(v.bias, kv_heads, head_dim),
        None if o.bias is None else owned(o.bias, hidden))


def _attention_classes() -> dict[str, tuple[Any, Any, tuple[tuple[bool, ...], ...]]]:
    """Config class name -> (config class, attention class, the bias patterns it holds)."""
    from transformers import LlamaConfig, Qwen2Config
    from transformers.models.llama.modeling_llama import LlamaAttention
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

    return {"LlamaConfig": (LlamaConfig, LlamaAttention, ((False,) * 4, (True,) * 4)),
            "Qwen2Config": (Qwen2Config, Qwen2Attention, ((True, True, True, False),))}


def to_hf(params: MHAParams, *, config_class: Any = None, attn_implementation: str = "eager") -> Any:
    """A new HF attention module holding ``params`` exactly (the inverse of ``from_hf``):
    ``LlamaAttention`` (no biases, or all four: ``attention_bias``), or ``Qwen2Attention`` when q, k
    and v have biases and o has none; ``config_class`` (``LlamaConfig`` or ``Qwen2Config``) forces the
    family. Its config: ``hidden_size = d_q``, ``num_attention_heads = H``, ``num_key_value_heads =
    Hkv``, ``head_dim = hd``, ``attention_bias``, ``attention_dropout=0``, ``attn_implementation``
    (default ``"eager"``, HF's reference path; its float mask is additive). In the params' dtype, on
    the device of its torch tensors (else the CPU), in training mode like any new module. Call it
    with identity position embeddings to compare it with MHAParams (see the module docstring).

    Rejected with ConversionError (the class cannot hold them): d_k or d_v != d_q (self-attention:
    one hidden_size), d_out != d_q, hd_v != hd, a bias pattern the class cannot represent (Llama: all
    or none; Qwen2: q, k, v only), another config class, arrays of different dtypes.
    """
    import torch

    classes = _attention_classes()
    dims = layer_dims(params)
    if dims.d_k != dims.d_q or dims.d_v != dims.d_q or dims.d_out != dims.d_q:
        raise ConversionError(f"HF Llama-style attention is self-attention with one hidden_size: it needs d_q = d_k = "
                              f"d_v = d_out, got d_q={dims.d_q}, d_k={dims.d_k}, d_v={dims.d_v}, d_out={dims.d_out}")
    if dims.value_dim != dims.head_dim:
        raise ConversionError(f"HF Llama-style attention has one head_dim for q, k and v: it needs hd_v = hd, got "
                              f"hd={dims.head_dim}, hd_v={dims.value_dim}")
    pattern = has_biases(params)
    names = ", ".join(f"b{p}" for p, h in zip("qkvo", pattern, strict=True) if h) or "none"
    if config_class is None:
        family = next((n for n, (_, _, patterns) in classes.items() if pattern in patterns), None)
        if family is None:
            raise ConversionError(f"no HF attention class holds biases on {names}: LlamaAttention has all four or "
                                  "none, Qwen2Attention q, k and v only")
    else:
        family = getattr(config_class, "__name__", repr(config_class))
        if family not in classes or classes[family][0] is not config_class:
            raise ConversionError(f"to_hf supports config_class LlamaConfig or Qwen2Config, got {family}")
        if pattern not in classes[family][2]:
            holds = "all four biases or none" if family == "LlamaConfig" else "biases on q, k and v only"
            raise ConversionError(f"HF {classes[family][1].__name__} holds {holds}, got biases on {names}")
    dtype = single_dtype(params, f"HF {classes[family][1].__name__}")
    devices = {str(x.device) for x in params if x is not None and isinstance(x, torch.Tensor)}
    if len(devices) > 1:
        raise ConversionError(f"an HF attention module lives on one device, got params on {', '.join(sorted(devices))}")
    device = torch.device(devices.pop()) if devices else torch.device("cpu")
    config_cls, attention_cls, _ = classes[family]
    config = config_cls(hidden_size=dims.d_q, num_attention_heads=dims.heads, num_key_value_heads=dims.kv_heads,
                        head_dim=dims.head_dim, attention_bias=all(pattern), attention_dropout=0.0,
                        attn_implementation=attn_implementation)
    module = attention_cls(config, layer_idx=0).to(device=device, dtype=getattr(torch, dtype))
    p = params.map(lambda x: to_framework(x, "torch", device=device))
    with torch.no_grad():
        for proj, w, b in zip(_PROJECTIONS, p[:4], p[4:], strict=True):
            linear = getattr(module, proj)
            linear.weight.copy_(w.reshape(-1, linear.out_features).T if proj == "o_proj" else
                                w.reshape(linear.in_features, -1).T)
            if b is not None:
                linear.bias.copy_(b.reshape(-1))
    return module
