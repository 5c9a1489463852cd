"""torch ``nn.MultiheadAttention`` <-> :class:`~attention_ref.layers.MHAParams`, exactly, and its
masks -> this spec's ``(mask, bias)``.

torch stores projections as ``(out, in)`` matrices applied as ``x @ W.T + b``; feature ``h * hd + d``
of a projection is head ``h``. With E = ``embed_dim``, H = ``num_heads``, hd = E // H:

* ``wq = Wq.T.reshape(E, H, hd)``, ``wk = Wk.T.reshape(kdim, H, hd)``, ``wv = Wv.T.reshape(vdim, H, hd)``,
  where ``[Wq; Wk; Wv] = in_proj_weight`` (packed, kdim = vdim = E) or ``q/k/v_proj_weight``;
* ``bq, bk, bv = in_proj_bias.reshape(3, H, hd)``; ``wo = out_proj.weight.T.reshape(H, hd, E)``,
  ``bo = out_proj.bias``.

Importing this module imports no framework; torch is imported by each function.
"""

from __future__ import annotations

from typing import Any

from ..frameworks import dtype_name, framework_of, shape_of
from .conversion import ConversionError, all_or_no_biases, layer_dims, single_dtype, to_framework
from .params import MHAParams

_TARGET = "torch nn.MultiheadAttention"


def _owned(x: Any) -> Any:
    """A detached, contiguous copy (the params never alias the module's parameters)."""
    import torch

    return x.detach().clone(memory_format=torch.contiguous_format)


def from_torch(module: Any) -> MHAParams:
    """The parameters of a ``torch.nn.MultiheadAttention``, as an MHAParams of detached torch tensors
    (copies, in the module's dtype and on its device), exactly.

    Shapes: ``wq (E, H, hd)``, ``wk (kdim, H, hd)``, ``wv (vdim, H, hd)``, ``wo (H, hd, E)``; biases
    ``(H, hd)`` and ``(E,)``, or None with ``bias=False``. Packed (``in_proj_weight``) and separate
    (``kdim``/``vdim``: ``q/k/v_proj_weight``) projections both convert; ``batch_first`` and
    ``dropout`` are not parameters and are ignored (compare in eval mode, or with dropout 0).

    Rejected with ConversionError: ``add_bias_kv`` (a learned, already projected key ``bias_k`` and
    value ``bias_v`` appended to every sequence as an extra key) and ``add_zero_attn`` (an extra key
    and value of zeros appended after the head split): both make S + 1 keys out of S, which no
    projection weight can express. Build the module without them to compare its layer.
    """
    import torch

    if not isinstance(module, torch.nn.MultiheadAttention):
        raise TypeError(f"from_torch expects a torch.nn.MultiheadAttention, got {type(module).__name__}")
    if module.bias_k is not None or module.bias_v is not None:
        raise ConversionError(
            f"{_TARGET} with add_bias_kv=True appends a learned projected key bias_k and value bias_v to every "
            "sequence (S + 1 keys), which MHAParams has no place for; build the module with add_bias_kv=False")
    if module.add_zero_attn:
        raise ConversionError(
            f"{_TARGET} with add_zero_attn=True appends a key and value of zeros to every head (S + 1 keys), "
            "which MHAParams has no place for; build the module with add_zero_attn=False")
    heads, head_dim = module.num_heads, module.head_dim
    if module.in_proj_weight is not None:
        w_q, w_k, w_v = module.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
    wq, wk, wv = (_owned(w.T.reshape(shape_of(w)[1], heads, head_dim)) for w in (w_q, w_k, w_v))
    wo = _owned(module.out_proj.weight.T.reshape(heads, head_dim, module.embed_dim))
    bq = bk = bv = bo = None
    if module.in_proj_bias is not None:
        bq, bk, bv = (_owned(b.reshape(heads, head_dim)) for b in module.in_proj_bias.chunk(3))
    if module.out_proj.bias is not None:
        bo = _owned(module.out_proj.bias)
    return MHAParams(wq, wk, wv, wo, bq, bk, bv, bo)


def to_torch(params: MHAParams, *, batch_first: bool = False, dropout: float = 0.0) -> Any:
    """A new ``torch.nn.MultiheadAttention`` holding ``params`` exactly (the inverse of
    ``from_torch``): in the params' dtype, on the device of its torch tensors (the CPU for numpy or
    jax arrays, which are converted exactly), in training mode like any new module.

    ``embed_dim = d_q``, ``num_heads = H``, ``kdim = d_k``, ``vdim = d_v`` (separate
    ``q/k/v_proj_weight`` when either differs from d_q, else packed ``in_proj_weight``), ``bias``
    from the params' biases.

    Rejected with ConversionError (torch cannot hold them): GQA (Hkv < H), hd_v != hd, H * hd != d_q
    or d_out != d_q (torch's one width E), a partial set of biases (torch has one ``bias`` flag; add
    zeros yourself if you mean them), arrays of different dtypes.
    """
    import torch

    dims = layer_dims(params)
    dtype = single_dtype(params, _TARGET)
    if dims.kv_heads != dims.heads:
        raise ConversionError(f"{_TARGET} has no grouped-query attention: it needs Hkv = H, got H={dims.heads}, "
                              f"Hkv={dims.kv_heads}")
    if dims.value_dim != dims.head_dim:
        raise ConversionError(f"{_TARGET} has one head dim for q, k and v: it needs hd_v = hd, got "
                              f"hd={dims.head_dim}, hd_v={dims.value_dim}")
    embed = dims.heads * dims.head_dim
    if embed != dims.d_q or dims.d_out != dims.d_q:
        raise ConversionError(f"{_TARGET} has one width E = d_q = H * hd = d_out, got d_q={dims.d_q}, "
                              f"H * hd={dims.heads} * {dims.head_dim}={embed}, d_out={dims.d_out}")
    bias = all_or_no_biases(params, _TARGET)
    devices = {str(x.device) for x in params if framework_of(x) == "torch"}
    if len(devices) > 1:
        raise ConversionError(f"{_TARGET} lives on one device, got params on {', '.join(sorted(devices))}")
    device = torch.device(devices.pop()) if devices else torch.device("cpu")
    p = params.map(lambda x: to_framework(x, "torch", device=device))
    module = torch.nn.MultiheadAttention(
        embed, dims.heads, dropout=dropout, bias=bias, kdim=dims.d_k, vdim=dims.d_v, batch_first=batch_first,
        device=device, dtype=getattr(torch, dtype))
    w_q, w_k, w_v = (w.reshape(shape_of(w)[0], embed).T for w in (p.wq, p.wk, p.wv))
    with torch.no_grad():
        if module.in_proj_weight is not None:
            module.in_proj_weight.copy_(torch.cat([w_q, w_k, w_v]))
        else:
            module.q_proj_weight.copy_(w_q)
            module.k_proj_weight.copy_(w_k)
            module.v_proj_weight.copy_(w_v)
        module.out_proj.weight.copy_(p.wo.reshape(embed, dims.d_out).T)
        if bias:
            module.in_proj_bias.copy_(torch.cat([b.reshape(embed) for b in (p.bq, p.bk, p.bv)]))
            module.out_proj.bias.copy_(p.bo)
    return module


def from_torch_masks(attn_mask: Any, key_padding_mask: Any, num_heads: int, batch: int | None) -> tuple[Any, Any]:
    """torch ``nn.MultiheadAttention``'s ``attn_mask`` and ``key_padding_mask`` as this spec's
    ``(mask, bias)`` for ``multi_head_attention``, exactly.

    **Polarity.** A torch MHA *bool* mask means **True = do NOT attend** (the key is ignored); this
    spec's ``mask`` means **True = may attend**. The bool masks are inverted here (``~m``). torch
    float masks are additive and are returned in ``bias`` unchanged (a 0/-inf float mask stays a
    bias: the same result).

    ``attn_mask``: None, ``(L, S)``, or ``(N * H, L, S)`` **batch-major**: row ``n * H + h`` is batch
    ``n``, head ``h`` (a head-major tensor has the same shape and gives torch a silently different
    result; it is not detected). ``key_padding_mask``: None, ``(N, S)`` bool (True = padding, ignore)
    or float (additive). ``batch`` is N, or None for unbatched torch inputs (``attn_mask`` ``(L, S)``
    or ``(H, L, S)``, ``key_padding_mask`` ``(S,)``).

    Returns ``mask`` (bool, True = may attend, or None) broadcastable to ``(N, H, L, S)`` (``(H, L,
    S)`` unbatched): ``(L, S)``, ``(N, H, L, S)``, ``(N, 1, 1, S)`` or their intersection, and
    ``bias`` (float, or None) likewise: the sum of the float masks, as torch adds them. Arrays stay in
    their framework. Raises ConversionError for shapes or dtypes torch MHA would not accept.
    """
    for name, m in (("attn_mask", attn_mask), ("key_padding_mask", key_padding_mask)):
        if m is not None and dtype_name(m) != "bool" and not dtype_name(m).startswith(("float", "bfloat")):
            raise ConversionError(f"torch MHA's {name} must be bool (True = do not attend) or float (additive), "
                                  f"got {dtype_name(m)}")
    rows = num_heads if batch is None else batch * num_heads
    lead = (num_heads,) if batch is None else (batch, num_heads)
    masks: list[Any] = []
    biases: list[Any] = []
    if attn_mask is not None:
        shape = shape_of(attn_mask)
        if len(shape) == 3:
            if shape[0] != rows:
                raise ConversionError(
                    f"torch MHA's 3-D attn_mask must be (N * H, L, S) = ({rows}, L, S) with row n * H + h for batch "
                    f"n, head h, got {shape}")
            attn_mask = attn_mask.reshape(*lead, *shape[1:])
        elif len(shape) != 2:
            raise ConversionError(f"torch MHA's attn_mask must be (L, S) or (N * H, L, S), got {shape}")
        (masks if dtype_name(attn_mask) == "bool" else biases).append(attn_mask)
    if key_padding_mask is not None:
        shape = shape_of(key_padding_mask)
        expected = "(S,)" if batch is None else f"(N, S) = ({batch}, S)"
        if len(shape) != (1 if batch is None else 2) or (batch is not None and shape[0] != batch):
            raise ConversionError(f"torch MHA's key_padding_mask must be {expected}, got {shape}")
        if attn_mask is not None and shape[-1] != shape_of(attn_mask)[-1]:
            raise ConversionError(f"torch MHA's key_padding_mask {shape} and attn_mask {shape_of(attn_mask)} "
                                  "disagree on S")
        padding = key_padding_mask.reshape(*lead[:-1], 1, 1, shape[-1])
        (masks if dtype_name(padding) == "bool" else biases).append(padding)
    mask = None
    for m in masks:
        mask = ~m if mask is None else mask & ~m  # torch bool: True = ignore; here True = may attend
    bias = None
    for b in biases:
        bias = b if bias is None else bias + b
    return mask, bias
