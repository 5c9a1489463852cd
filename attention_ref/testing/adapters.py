"""Built-in adapters: the framework attention kernels that ``attention-ref crosscheck`` checks.

Each :class:`Target` wraps one framework kernel in the calling convention of
``attention_ref.testing.check`` (the spec's keyword names) and declares, honestly, what it
supports and which of its conventions differ from SPEC.md. An adapter only *maps* arguments (the
bias and mask folded into the one float mask torch takes, causal folded into that mask when torch
refuses both, masks broadcast to the 4-D shape jax requires); it never computes part of the answer.

Targets come from builders, ``builder(device) -> list[Target]``, named by import path in
``TARGET_BUILDERS`` (the crosscheck's column order), so that a worker process can build its one
target again from its name (``find_target``); a builder imports no framework on the CPU.
``available_targets(device)`` lists every target whose framework is installed:

* ``torch.sdpa[BACKEND]``: ``torch.nn.functional.scaled_dot_product_attention`` pinned to one SDPA
  backend with ``torch.nn.attention.sdpa_kernel``: on the CPU ``MATH`` and ``FLASH_ATTENTION`` (the
  CPU flash kernel); on CUDA also ``EFFICIENT_ATTENTION`` and ``CUDNN_ATTENTION``.
* ``torch.sdpa causal_lower_right``: causal through ``torch.nn.attention.bias.causal_lower_right``
  (bottom_right) and ``causal_upper_left`` (top_left), with torch's own backend dispatch.
* ``jax.nn.dot_product_attention[xla]`` (and ``[cudnn]`` on a GPU): layout (B, L, H, E); a fully
  masked row gives mean(v) (a finite mask fill).
* ``flax.nnx.dot_product_attention``: the same conventions, no scale keyword.
* ``keras.ops.dot_product_attention[jax]``, ``[torch]`` and ``[torch, bias]``: keras 3 on its jax
  and torch backends, each in a process of its own (``Target.environment``: ``KERAS_BACKEND``).

Targets with the packed varlen interface (``Target.interface = "varlen"``) are in ``varlen_targets``.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..plan import FLOATING_DTYPES
from .report import PropertyOutcome, Status

HALF_AND_SINGLE = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class Target:
    """A framework kernel with the arguments of ``attention_ref.testing.check``, and how the
    crosscheck runs it.

    A target that is not a kernel (a framework layer, say) subclasses this and overrides
    :meth:`plan` and :meth:`run`; the crosscheck needs nothing else of it."""

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
    #: The kernel's backward pass for ``check(backward=...)``; None: the checker's autodiff of ``kernel``.
    backward: Callable[..., Any] | None = None
    #: Environment variables the target's worker process needs (keras: ``KERAS_BACKEND``).
    environment: tuple[tuple[str, str], ...] = ()
    #: Rough seconds of a default CPU crosscheck (float32, 10 examples, 2 cores); the slowest start first.
    cost: float = 5.0
    #: The builder that made it (``"module:function"``, set by ``available_targets``), for a worker to
    #: build it again.
    builder: str = ""
    #: The kernel's calling convention, as ``check(interface=...)`` takes it: "dense", "varlen"
    #: (FlashAttention's packed interface, ``varlen_kernels``), "paged" (``paged_kernels``) or "flex" (the
    #: dense call with score_mod and mask_mod); each interface's own properties apply.
    interface: str = "dense"
    #: A varlen kernel's declared conventions, as ``check`` takes them (``("empty_lse", "+inf")``,
    #: ``("lse_layout", "padded")``, ``("causal_alignment", "bottom_right")``): verified, never hidden.
    conventions: tuple[tuple[str, str], ...] = ()
    #: False for an adapter declared from its kernel's documentation and never yet run (CUDA-only
    #: kernels until a GPU run shows otherwise): reports mark it "not verified".
    verified: bool = True
    #: Run only when a crosscheck names it (``only``, ``--target``): a target too slow for the default run.
    opt_in: bool = False

    def plan(self, dtypes: Sequence[str], properties: Sequence[str] | None = None) -> list[PropertyOutcome]:
        """The report's rows before anything runs: each property that will run with status ERROR (what
        it stays if the run dies before it), the others "n/a" or "not run", in report order."""
        from .check import interface_features
        from .runner import PROPERTIES
        from .strategies import Features

        features = interface_features(Features(frozenset(self.supports), tuple(dtypes), few_shapes=self.few_shapes),
                                      self.interface, dict(self.conventions).get("causal_alignment"))
        return [PropertyOutcome(prop.name, prop.rules,
                                Status.NOT_RUN if properties is not None and prop.name not in properties
                                else Status.ERROR if prop.applies_to(features) else Status.NOT_APPLICABLE)
                for prop in PROPERTIES]

    def run(self, *, dtypes: Sequence[str], max_examples: int, seed: int | None,
            properties: Sequence[str] | None = None, plot_dir: str | None = None) -> Any:
        """``check`` of the kernel with its declarations (a ``CheckReport``); ``plot_dir`` as for
        ``check``."""
        from .check import check

        declared = dict(self.conventions)
        return check(self.kernel, framework=self.framework, supports=self.supports, layout=self.layout,
                     dtypes=dtypes, fully_masked=self.fully_masked, max_examples=max_examples, seed=seed,
                     name=self.name, device=self.device, few_shapes=self.few_shapes, backward=self.backward,
                     properties=properties, plot_dir=plot_dir, interface=self.interface,
                     empty_lse=declared.get("empty_lse", "-inf"), lse_layout=declared.get("lse_layout", "packed"),
                     causal_alignment=declared.get("causal_alignment"))


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _cuda_in_torch() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _jax_platform(device: str) -> str | None:
    """jax's platform for ``device`` ("cpu" or "gpu"), None when jax has no such device (jax is
    imported only to ask for a GPU)."""
    if device == "cpu":
        return "cpu"
    import jax

    try:
        jax.devices("gpu")
    except RuntimeError:
        return None
    return "gpu"


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


def torch_targets(device: str) -> list[Target]:
    """The torch SDPA targets (torch is imported only to ask for CUDA)."""
    if not _installed("torch") or (device != "cpu" and not _cuda_in_torch()):
        return []
    full = ("mask", "bias", "scale", "causal", "gqa", "value_dim", "grad", "dbias")
    notes_zero = ("fully masked rows: 0 (torch's _safe_softmax), as SPEC.md",
                  "adapter: bias and mask passed as one float attn_mask (-inf where masked); causal folded into "
                  "it when a mask or bias is given (torch refuses attn_mask with is_causal)",
                  "gradients through torch.autograd (dbias through the float attn_mask); no window in SDPA; "
                  "dropout not checked (SDPA draws its own mask)")
    targets = [Target("torch.sdpa[MATH]", "torch", torch_sdpa("MATH"), full, device=device, notes=notes_zero,
                      cost=3)]
    if device == "cpu":
        targets.append(Target(
            "torch.sdpa[FLASH_ATTENTION]", "torch", torch_sdpa("FLASH_ATTENTION"),
            tuple(f for f in full if f not in ("value_dim", "dbias")), device=device, cost=10,
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
        ("scale", "causal", "bottom_right", "gqa", "value_dim", "grad"), device=device, cost=5,
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


def _jax_call(attention: Callable[..., Any], q: Any, k: Any, v: Any, mask: Any, bias: Any, *,
              broadcast: bool = True, **options: Any) -> Any:
    """``attention(q, k, v, bias=, mask=, **options)`` with float64 inside a scoped
    ``jax.enable_x64``, jitted (one compilation per shape; a ``scale`` option is traced, not
    static) except for float16 and bfloat16: XLA on the CPU refuses their float32-accumulating dot
    presets under jit."""
    import jax
    import jax.numpy as jnp

    with jax.enable_x64(q.dtype == jnp.float64):
        if q.dtype in (jnp.float16, jnp.bfloat16):
            if broadcast:
                mask, bias = _jax_mask_and_bias(q, k, mask, bias)
            return attention(q, k, v, bias=bias, mask=mask, **options)
        scale = options.pop("scale", None)
        static = tuple(sorted(options.items()))
        return _jitted(attention, static, scale is not None, broadcast)(q, k, v, bias, mask, scale)


_JITTED: dict[Any, Any] = {}


def _jitted(attention: Callable[..., Any], static: tuple[tuple[str, Any], ...], scaled: bool,
            broadcast: bool) -> Any:
    import jax

    key = (attention, static, scaled, broadcast)
    if key not in _JITTED:
        def call(q: Any, k: Any, v: Any, bias: Any, mask: Any, scale: Any) -> Any:
            if broadcast:
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
    """``flax.nnx.dot_product_attention`` in (B, L, H, E), no dropout; mask and bias as given (flax
    documents them broadcastable to (batch..., heads, L, S))."""
    from flax import nnx

    return _jax_call(nnx.dot_product_attention, q, k, v, mask, bias, broadcast=False, is_causal=causal,
                     deterministic=True)


def jax_backward(kernel: Callable[..., Any], *, dbias: bool) -> Callable[..., Any]:
    """``backward(q, k, v, d_out, **keywords) -> (dq, dk, dv, dbias)`` for ``check(backward=...)``:
    ``jax.vjp`` of ``kernel`` (its bias differentiated with ``dbias``, else held constant), jitted
    as one program per shape, forward and backward together (as a jitted training step runs them;
    one compilation instead of the two of the checker's default vjp of a jitted call). mask, bias
    and scale are traced, the other keywords static; float16 and bfloat16 unjitted, as
    ``_jax_call``."""

    def backward(q: Any, k: Any, v: Any, d_out: Any, **keywords: Any) -> Any:
        import jax
        import jax.numpy as jnp

        traced: dict[str, Any] = {name: keywords.pop(name) for name in ("mask", "bias", "scale") if name in keywords}
        key = (kernel, dbias, tuple(sorted(keywords.items())), tuple(sorted(traced)))
        with jax.enable_x64(q.dtype == jnp.float64):
            if q.dtype in (jnp.float16, jnp.bfloat16):
                return _vjp(kernel, dbias, keywords, q, k, v, d_out, traced)
            if key not in _JITTED:
                static = dict(keywords)
                _JITTED[key] = jax.jit(lambda q, k, v, d_out, traced: _vjp(kernel, dbias, static, q, k, v, d_out,
                                                                            traced))
            return _JITTED[key](q, k, v, d_out, traced)

    return backward


def _vjp(kernel: Callable[..., Any], dbias: bool, static: dict[str, Any], q: Any, k: Any, v: Any, d_out: Any,
         traced: dict[str, Any]) -> Any:
    import jax

    bias = traced.get("bias")
    others = {name: x for name, x in traced.items() if name != "bias"}

    def forward(q: Any, k: Any, v: Any, differentiated: Any) -> Any:
        used = differentiated if dbias else bias
        result = kernel(q, k, v, **static, **others, **({} if used is None else {"bias": used}))
        return result[0] if isinstance(result, tuple) else result

    _, pullback = jax.vjp(forward, q, k, v, bias if dbias else None)
    return pullback(d_out)


def jax_targets(device: str) -> list[Target]:
    """jax.nn's and flax nnx's dot_product_attention (jax is imported only to ask for a GPU)."""
    platform = _jax_platform(device) if _installed("jax") else None
    if platform is None:
        return []
    jax_device = None if device == "cpu" else platform
    mean_v = ("fully masked rows: mean(v) over the masked keys (mask fill -0.7 * float32 max); "
              "NaN when a -inf bias alone excludes the row",)
    layout_note = ("layout (B, L, H, E); mask and bias broadcast to 4-D; jitted (float32, float64), so sizes come "
                   "from a small menu")
    grad_note = ("gradients: jax.vjp of the call, jitted as one program per shape; fully masked rows get a zero "
                 "cotangent, since their mean(v) is a convention",)
    xla = jax_nn("xla")
    targets = [Target("jax.nn.dot_product_attention[xla]", "jax", xla,
                      ("mask", "bias", "scale", "causal", "gqa", "lse", "window", "grad", "dbias"), layout="blhd",
                      fully_masked="mean_v", device=jax_device, few_shapes=True, backward=jax_backward(xla, dbias=True),
                      cost=110,
                      notes=(*mean_v, layout_note, "lse through return_residual=True",
                             "window as local_window_size=(left, right) (top-left; None as L + S)", *grad_note))]
    if platform == "gpu":
        cudnn = jax_nn("cudnn")
        targets.append(Target("jax.nn.dot_product_attention[cudnn]", "jax", cudnn,
                              ("mask", "bias", "scale", "causal", "gqa", "lse", "window", "grad"), layout="blhd",
                              dtypes=("float16", "bfloat16"), device=jax_device, few_shapes=True,
                              backward=jax_backward(cudnn, dbias=False), cost=60,
                              notes=("fully masked rows: 0 (cudnn), as SPEC.md", layout_note)))
    if _installed("flax"):
        targets.append(Target("flax.nnx.dot_product_attention", "jax", flax_nnx, ("mask", "bias", "causal", "gqa"),
                              layout="blhd", fully_masked="mean_v", device=jax_device, few_shapes=True, cost=30,
                              notes=(*mean_v, "layout (B, L, H, E); mask and bias passed as given (flax broadcasts "
                                     "them); jitted (float32, float64), so sizes come from a small menu",
                                     "no scale keyword (always 1/sqrt(E))",
                                     "gradients not re-checked: without dropout it delegates to jax.nn, whose "
                                     "gradients are; dropout not checked (flax draws its own mask)")))
    return targets


# ---- keras ---------------------------------------------------------------------------------------


def _keras_ops(backend: str) -> Any:
    """``keras.ops``, once keras runs on ``backend``: keras reads ``KERAS_BACKEND`` once, when it is
    first imported, so a keras target runs in a process of its own with that variable set
    (``Target.environment``: the crosscheck's workers never mix environments)."""
    import keras

    if keras.backend.backend() != backend:
        raise RuntimeError(f"keras runs on its {keras.backend.backend()!r} backend in this process; this target "
                           f"needs KERAS_BACKEND={backend} set before keras is imported")
    return keras.ops


def keras_dot_product_attention(backend: str) -> Callable[..., Any]:
    """``keras.ops.dot_product_attention`` on keras' ``backend`` ("jax" or "torch"), with keras' own
    layout (B, L, H, E) and defaults (``flash_attention=None``: keras decides). On the jax backend
    the call is jitted (as keras runs it inside a jitted step), one compilation per shape."""

    def kernel(q: Any, k: Any, v: Any, *, mask: Any = None, bias: Any = None, scale: Any = None,
               causal: bool = False) -> Any:
        ops = _keras_ops(backend)
        if backend == "jax":
            return _jax_call(ops.dot_product_attention, q, k, v, mask, bias, broadcast=False, scale=scale,
                             is_causal=causal)
        return ops.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, is_causal=causal)

    kernel.__name__ = f"keras_dot_product_attention_{backend}"
    return kernel


def keras_targets(device: str) -> list[Target]:
    """keras' ``ops.dot_product_attention`` on each installed keras backend (jax, torch); keras is not
    imported here (each target imports it in its own process, with ``KERAS_BACKEND`` set)."""
    if not _installed("keras"):
        return []
    jax_platform = _jax_platform(device) if _installed("jax") else None
    torch_ok = _installed("torch") and (device == "cpu" or _cuda_in_torch())
    layout = ("layout (B, L, H, E) (keras' (B, T, N, H)); flash_attention=None (keras decides: never on the CPU); "
              "float64 inputs are computed and returned in float32 by keras, so float64 is not declared; no window, "
              "softcap (JAX on TPU only), dropout, weights or lse")
    causal = "causal: is_causal, top-left (tril(ones(L, S)))"
    targets = []
    if jax_platform is not None:
        kernel = keras_dot_product_attention("jax")
        targets.append(Target(
            "keras.ops.dot_product_attention[jax]", "jax", kernel,
            ("mask", "bias", "scale", "causal", "gqa", "grad", "dbias"), layout="blhd", fully_masked="mean_v",
            dtypes=HALF_AND_SINGLE, device=None if device == "cpu" else jax_platform, few_shapes=True,
            backward=jax_backward(kernel, dbias=True), environment=(("KERAS_BACKEND", "jax"),), cost=100,
            notes=("fully masked rows: mean(v) over the masked keys (keras hands the call to jax.nn, mask fill "
                   "-0.7 * float32 max); NaN when a -inf bias alone excludes the row",
                   layout, causal, "mask and bias passed as given (keras broadcasts them); jitted (float32), so "
                   "sizes come from a small menu; Ev == E (keras requires value of key's shape)",
                   "gradients: jax.vjp of the call, jitted as one program per shape; fully masked rows get a zero "
                   "cotangent")))
    if torch_ok:
        kernel = keras_dot_product_attention("torch")
        environment = (("KERAS_BACKEND", "torch"),)
        torch_common = ("keras hands the call to torch SDPA without pinning a backend (torch's own dispatch: the "
                        "CPU flash kernel where it applies)",)
        targets += [
            Target("keras.ops.dot_product_attention[torch]", "torch", kernel,
                   ("mask", "scale", "causal", "gqa", "value_dim", "grad"), layout="blhd", fully_masked="mean_v",
                   dtypes=HALF_AND_SINGLE, device=device, environment=environment, cost=8,
                   notes=("fully masked rows: mean(v) over the masked keys (keras turns the bool mask into an "
                          "additive -0.7 * 3.38953e38, -0.7 * 65500 in float16)", layout, causal, *torch_common,
                          "no bias here: keras' torch backend refuses a mask with a bias (ValueError 'Only one of "
                          "`bias` and `mask` can be provided'), and a -inf bias row gives 0, not the mask's mean(v); "
                          "bias is the [torch, bias] target")),
            Target("keras.ops.dot_product_attention[torch, bias]", "torch", kernel,
                   ("bias", "scale", "gqa", "value_dim", "grad", "dbias"), layout="blhd",
                   dtypes=HALF_AND_SINGLE, device=device, environment=environment, cost=8,
                   notes=("the bias alone (keras passes it to torch SDPA as attn_mask); fully masked rows (a -inf "
                          "bias row): 0 (torch's _safe_softmax), as SPEC.md", layout, *torch_common,
                          "no causal here: keras passes the bias as attn_mask together with is_causal=True, which "
                          "torch's math backend refuses (RuntimeError) and the CPU flash kernel takes (NaN for "
                          "scale <= 0); causal is checked on the [torch] target")),
        ]
    return targets


#: The builders of the built-in targets (``builder(device) -> list[Target]``, by import path, so that a
#: worker process can build its target again), in the crosscheck's column order.
TARGET_BUILDERS = (
    "attention_ref.testing.adapters:torch_targets",
    "attention_ref.testing.adapters:jax_targets",
    "attention_ref.testing.adapters:keras_targets",
    "attention_ref.testing.varlen_targets:jax_varlen_targets",
    "attention_ref.testing.varlen_targets:torch_varlen_targets",
    "attention_ref.testing.flex_targets:flex_targets",
    "attention_ref.testing.cuda_targets:cuda_kernel_targets",
    "attention_ref.testing.layer_targets:torch_layer_targets",
    "attention_ref.testing.layer_targets:flax_layer_targets",
    "attention_ref.testing.layer_targets:keras_layer_targets",
)


def load_builder(path: str) -> Callable[[str], list[Target]]:
    """The builder named ``"module:function"``."""
    module, _, function = path.partition(":")
    builder: Callable[[str], list[Target]] = getattr(importlib.import_module(module), function)
    return builder


def available_targets(device: str = "cpu", builders: Sequence[str] = TARGET_BUILDERS) -> list[Target]:
    """Every target of ``builders`` whose framework is installed and can run on ``device`` ("cpu" or
    "cuda"), each with its ``builder`` set."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    return [replace(target, builder=path) for path in builders for target in load_builder(path)(device)]


def find_target(name: str, device: str, builder: str) -> Target:
    """The target called ``name`` that ``builder`` makes for ``device`` (LookupError when it makes none)."""
    for target in available_targets(device, (builder,)):
        if target.name == name:
            return target
    raise LookupError(f"{builder} makes no target {name!r} on {device}")
