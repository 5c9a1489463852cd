"""Built-in adapters: the framework attention kernels that ``attention-ref crosscheck`` checks.

Each :class:`Target` wraps one framework kernel in the calling convention of
``attention_ref.testing.check`` (the spec's keyword names) and declares, honestly, what it
supports and which of its conventions differ from SPEC.md. An adapter only *maps* arguments (the
bias and mask folded into the one float mask torch takes, causal folded into that mask when torch
refuses both, masks broadcast to the 4-D shape jax requires); it never computes part of the answer.

Targets (``available_targets(device)``), each only when its framework is installed:

* ``torch.sdpa[BACKEND]``: ``torch.nn.functional.scaled_dot_product_attention`` pinned to one SDPA
  backend with ``torch.nn.attention.sdpa_kernel``: on the CPU ``MATH`` and ``FLASH_ATTENTION`` (the
  CPU flash kernel); on CUDA also ``EFFICIENT_ATTENTION`` and ``CUDNN_ATTENTION``.
* ``torch.sdpa causal_lower_right``: causal through ``torch.nn.attention.bias.causal_lower_right``
  (bottom_right) and ``causal_upper_left`` (top_left), with torch's own backend dispatch.
* ``jax.nn.dot_product_attention[xla]`` (and ``[cudnn]`` on a GPU): layout (B, L, H, E); a fully
  masked row gives mean(v) (a finite mask fill).
* ``flax.nnx.dot_product_attention``: the same conventions, no scale keyword.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..plan import FLOATING_DTYPES

HALF_AND_SINGLE = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class Target:
    """A framework kernel with the arguments of ``attention_ref.testing.check``."""

    name: str
    framework: str
    kernel: Callable[..., Any]
    supports: tuple[str, ...]
    layout: str = "bhld"
    fully_masked: str = "zero"
    dtypes: tuple[str, ...] = FLOATING_DTYPES
    device: str | None = None
    #: Compiled once per shape: draw sizes from a small menu (``strategies.FEW_SHAPES``).
    few_shapes: bool = False
    #: Declared conventions and adapter choices, printed with the report.
    notes: tuple[str, ...] = ()


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# ---- torch ---------------------------------------------------------------------------------------


def _torch_float_mask(q: Any, mask: Any, bias: Any, causal_keep: Any) -> Any:
    """One 4-D torch ``attn_mask`` for the spec's mask, bias and folded causal pattern: bool when
    there is no bias, else the bias (widened exactly to q's dtype, or float32 for half-precision q)
    with -inf where the mask or the causal rule excludes."""
    import torch

    keep = mask
    if causal_keep is not None:
        keep = causal_keep if keep is None else keep & causal_keep
    if bias is not None:
        dtype = q.dtype if q.dtype in (torch.float32, torch.float64) else torch.float32
        bias = bias.to(dtype)
        keep = bias if keep is None else bias.masked_fill(~keep, float("-inf"))
    while keep is not None and keep.dim() < 4:  # the CPU flash kernel takes 2-D or 4-D masks only
        keep = keep.unsqueeze(0)
    return keep


def _causal_keep(q: Any, k: Any, alignment: str) -> Any:
    import torch

    length, keys = q.shape[-2], k.shape[-2]
    offset = 0 if alignment == "top_left" else keys - length
    rows = torch.arange(length, device=q.device)[:, None]
    return torch.arange(keys, device=q.device)[None, :] <= rows + offset


def torch_sdpa(backend: str) -> Callable[..., Any]:
    """``F.scaled_dot_product_attention`` under ``sdpa_kernel(SDPBackend.<backend>)``. ``is_causal``
    is used when causal comes alone; with a mask or bias, torch refuses both, so causal is folded
    into the mask. GQA through ``enable_gqa``."""

    def kernel(q: Any, k: Any, v: Any, *, mask: Any = None, bias: Any = None, scale: Any = None,
               causal: bool = False) -> Any:
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        fold = causal and (mask is not None or bias is not None)
        attn_mask = _torch_float_mask(q, mask, bias, _causal_keep(q, k, "top_left") if fold else None)
        with sdpa_kernel(getattr(SDPBackend, backend)):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal and not fold,
                                                  scale=scale, enable_gqa=q.shape[-3] != k.shape[-3])

    kernel.__name__ = f"sdpa_{backend.lower()}"
    return kernel


def torch_sdpa_causal_variants(q: Any, k: Any, v: Any, *, scale: Any = None, causal: bool = False,
                               alignment: str = "top_left") -> Any:
    """Causal through torch's ``CausalBias`` objects: ``causal_lower_right`` for bottom_right,
    ``causal_upper_left`` for top_left (torch's dispatch picks the backend)."""
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right, causal_upper_left

    attn_mask = None
    if causal:
        variant = causal_lower_right if alignment == "bottom_right" else causal_upper_left
        attn_mask = variant(q.shape[-2], k.shape[-2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale,
                                          enable_gqa=q.shape[-3] != k.shape[-3])


def _torch_targets(device: str) -> list[Target]:
    import torch

    if device != "cpu" and not torch.cuda.is_available():
        return []
    full = ("mask", "bias", "scale", "causal", "gqa", "value_dim", "grad", "dbias")
    notes_zero = ("fully masked rows: 0 (torch's _safe_softmax), as SPEC.md",
                  "adapter: bias and mask passed as one float attn_mask (-inf where masked); causal folded into "
                  "it when a mask or bias is given (torch refuses attn_mask with is_causal)",
                  "gradients through torch.autograd (dbias through the float attn_mask); no window in SDPA; "
                  "dropout not checked (SDPA draws its own mask)")
    targets = [Target("torch.sdpa[MATH]", "torch", torch_sdpa("MATH"), full, device=device, notes=notes_zero)]
    if device == "cpu":
        targets.append(Target(
            "torch.sdpa[FLASH_ATTENTION]", "torch", torch_sdpa("FLASH_ATTENTION"),
            tuple(f for f in full if f not in ("value_dim", "dbias")), device=device,
            notes=(*notes_zero, "the CPU flash kernel needs Ev == E; its backward refuses an attn_mask that "
                                "requires grad, so dbias is not checked")))
    else:
        targets += [
            Target("torch.sdpa[FLASH_ATTENTION]", "torch", torch_sdpa("FLASH_ATTENTION"),
                   ("scale", "gqa", "grad"), dtypes=("float16", "bfloat16"), device=device,
                   notes=("CUDA flash: no masks; is_causal refused when L != S, so causal is not checked",)),
            Target("torch.sdpa[EFFICIENT_ATTENTION]", "torch", torch_sdpa("EFFICIENT_ATTENTION"),
                   ("mask", "bias", "scale", "causal", "grad", "dbias"), dtypes=HALF_AND_SINGLE, device=device,
                   notes=(*notes_zero, "no enable_gqa kernel; Ev == E")),
            Target("torch.sdpa[CUDNN_ATTENTION]", "torch", torch_sdpa("CUDNN_ATTENTION"),
                   ("mask", "bias", "scale", "causal", "gqa", "grad"), dtypes=("float16", "bfloat16"), device=device,
                   fully_masked="skip",
                   notes=("fully masked rows: the unmasked attention (cuDNN fills bool masks with -65504), "
                          "so they are not compared",)),
        ]
    targets.append(Target(
        "torch.sdpa causal_lower_right", "torch", torch_sdpa_causal_variants,
        ("scale", "causal", "bottom_right", "gqa", "value_dim", "grad"), device=device,
        notes=("causal as torch.nn.attention.bias.causal_lower_right (bottom_right) / causal_upper_left "
               "(top_left); no other mask, since a CausalBias cannot be combined with one",)))
    return targets


# ---- jax and flax ----------------------------------------------------------------------------------


def _jax_mask_and_bias(q: Any, k: Any, mask: Any, bias: Any) -> tuple[Any, Any]:
    """mask and bias (spec layout, broadcastable to (B, Hq, L, S)) broadcast to the 4-D shape that
    jax.nn requires; the bias in q's dtype when it widens exactly, else kept."""
    import jax.numpy as jnp

    shape = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])  # (B, Hq, L, S) from (B, L, H, E)
    mask = None if mask is None else jnp.broadcast_to(mask, shape)
    bias = None if bias is None else jnp.broadcast_to(bias, shape)
    return mask, bias


def _jax_call(attention: Callable[..., Any], q: Any, k: Any, v: Any, mask: Any, bias: Any,
              **options: Any) -> Any:
    """``attention(q, k, v, bias=, mask=, **options)`` with float64 inside a scoped
    ``jax.enable_x64``, jitted (one compilation per shape; a ``scale`` option is traced, not
    static) except for float16 and bfloat16: XLA on the CPU refuses their float32-accumulating dot
    presets under jit."""
    import jax
    import jax.numpy as jnp

    with jax.enable_x64(q.dtype == jnp.float64):
        if q.dtype in (jnp.float16, jnp.bfloat16):
            mask, bias = _jax_mask_and_bias(q, k, mask, bias)
            return attention(q, k, v, bias=bias, mask=mask, **options)
        scale = options.pop("scale", None)
        static = tuple(sorted(options.items()))
        return _jitted(attention, static, scale is not None)(q, k, v, bias, mask, scale)


_JITTED: dict[Any, Any] = {}


def _jitted(attention: Callable[..., Any], static: tuple[tuple[str, Any], ...], scaled: bool) -> Any:
    import jax

    key = (attention, static, scaled)
    if key not in _JITTED:
        def call(q: Any, k: Any, v: Any, bias: Any, mask: Any, scale: Any) -> Any:
            mask, bias = _jax_mask_and_bias(q, k, mask, bias)
            extra = {"scale": scale} if scaled else {}
            return attention(q, k, v, bias=bias, mask=mask, **extra, **dict(static))

        _JITTED[key] = jax.jit(call)
    return _JITTED[key]


def jax_local_window_size(window: Any, q: Any, k: Any) -> Any:
    """SPEC.md's ``window=(left, right)`` as jax's ``local_window_size=(left, right)``: both top-left, the
    same inequalities (``i - left <= j <= i + right``); an unbounded side (None) becomes
    ``L + S``, which excludes no key."""
    if window is None:
        return None
    unbounded = q.shape[1] + k.shape[1]  # (B, L, H, E) layout
    return tuple(unbounded if side is None else int(side) for side in window)


def jax_nn(implementation: str) -> Callable[..., Any]:
    """``jax.nn.dot_product_attention(implementation=...)`` in (B, L, H, E); lse through
    ``return_residual``; window through ``local_window_size`` (top-left)."""

    def kernel(q: Any, k: Any, v: Any, *, mask: Any = None, bias: Any = None, scale: Any = None,
               causal: bool = False, window: Any = None, return_lse: bool = False) -> Any:
        import jax

        result = _jax_call(jax.nn.dot_product_attention, q, k, v, mask, bias, scale=scale, is_causal=causal,
                           local_window_size=jax_local_window_size(window, q, k),
                           implementation=implementation, return_residual=return_lse)
        if return_lse:
            out, lse = result
            return out, None, lse
        return result

    kernel.__name__ = f"jax_nn_{implementation}"
    return kernel


def flax_nnx(q: Any, k: Any, v: Any, *, mask: Any = None, bias: Any = None, causal: bool = False) -> Any:
    """``flax.nnx.dot_product_attention`` in (B, L, H, E), no dropout."""
    from flax import nnx

    return _jax_call(nnx.dot_product_attention, q, k, v, mask, bias, is_causal=causal, deterministic=True)


def _jax_targets(device: str) -> list[Target]:
    import jax

    platform = "cpu" if device == "cpu" else "gpu"
    try:
        jax.devices(platform)
    except RuntimeError:
        return []
    jax_device = None if device == "cpu" else platform
    mean_v = ("fully masked rows: mean(v) over the masked keys (mask fill -0.7 * float32 max); "
              "NaN when a -inf bias alone excludes the row",)
    layout_note = ("layout (B, L, H, E); mask and bias broadcast to 4-D; jitted (float32, float64), so sizes come "
                   "from a small menu")
    grad_note = ("gradients through jax.vjp of the (jitted) call; fully masked rows get a zero cotangent, since "
                 "their mean(v) is a convention",)
    targets = [Target("jax.nn.dot_product_attention[xla]", "jax", jax_nn("xla"),
                      ("mask", "bias", "scale", "causal", "gqa", "lse", "window", "grad", "dbias"), layout="blhd",
                      fully_masked="mean_v", device=jax_device, few_shapes=True,
                      notes=(*mean_v, layout_note, "lse through return_residual=True",
                             "window as local_window_size=(left, right) (top-left; None as L + S)", *grad_note))]
    if platform == "gpu":
        targets.append(Target("jax.nn.dot_product_attention[cudnn]", "jax", jax_nn("cudnn"),
                              ("mask", "bias", "scale", "causal", "gqa", "lse", "window", "grad"), layout="blhd",
                              dtypes=("float16", "bfloat16"), device=jax_device, few_shapes=True,
                              notes=("fully masked rows: 0 (cudnn), as SPEC.md", layout_note)))
    if _installed("flax"):
        targets.append(Target("flax.nnx.dot_product_attention", "jax", flax_nnx, ("mask", "bias", "causal", "gqa"),
                              layout="blhd", fully_masked="mean_v", device=jax_device, few_shapes=True,
                              notes=(*mean_v, layout_note, "no scale keyword (always 1/sqrt(E))",
                                     "gradients not re-checked: without dropout it delegates to jax.nn, whose "
                                     "gradients are; dropout not checked (flax draws its own mask)")))
    return targets


def available_targets(device: str = "cpu") -> list[Target]:
    """Every built-in target whose framework is installed and can run on ``device`` ("cpu" or
    "cuda")."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    targets: list[Target] = []
    if _installed("torch"):
        targets += _torch_targets(device)
    if _installed("jax"):
        targets += _jax_targets(device)
    return targets
