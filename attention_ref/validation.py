"""The one front door: every backend validates its arguments here, before any computation.

``validate_attention_args`` checks every argument of ``attention`` against SPEC.md (rule 12 lists what
is checked) and returns an :class:`AttentionPlan`, the framework-neutral description of the call that
the backends execute. Because validation only reads ``.shape`` and ``.dtype``, the same bad input
raises the same exception type with the same message on every backend.

Shape letters: B... batch dims, Hq query heads, Hkv key/value heads, L queries, S keys,
E q/k head dim, Ev value head dim.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from .broadcasting import is_broadcastable
from .frameworks import FRAMEWORKS, device_of, dtype_name, framework_of, shape_of
from .mods import check_mod
from .plan import ALIGNMENTS, COMPUTE_DTYPES, DEFAULT_OPTIONS, FLOATING_DTYPES, AttentionOptions, AttentionPlan

__all__ = ["ALIGNMENTS", "COMPUTE_DTYPES", "FLOATING_DTYPES", "AttentionOptions", "AttentionPlan",
           "validate_attention_args", "validate_vjp_args"]


def _fmt(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(n) for n in shape) + ("," if len(shape) == 1 else "") + ")"


def _check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def _check_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number or None, got {value!r}")
    try:
        as_float = float(value)
    except OverflowError:
        as_float = math.inf
    if not math.isfinite(as_float):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return as_float


def _dtype_object_name(dtype: Any) -> str | None:
    """The name of a NumPy, JAX or torch dtype object (or scalar type), else None."""
    if type(dtype).__module__.split(".")[0] == "torch":
        return str(dtype).removeprefix("torch.")
    try:
        return np.dtype(dtype).name
    except TypeError:
        return None


def _check_compute_dtype(compute_dtype: Any, dtype: str) -> str:
    if compute_dtype is None:
        return "float64" if dtype == "float64" else "float32"
    name = compute_dtype if isinstance(compute_dtype, str) else _dtype_object_name(compute_dtype)
    if name not in COMPUTE_DTYPES:
        raise ValueError(
            f"compute_dtype must be None, 'float32' or 'float64' (or that dtype), got {compute_dtype!r}"
        )
    if dtype == "float64" and name == "float32":
        raise ValueError(
            "compute_dtype='float32' would compute float64 inputs in float32; "
            "use compute_dtype=None or 'float64', or cast the inputs yourself"
        )
    return name


def _check_scalar_range(name: str, value: float, compute_dtype: str, minimum: float = 0.0) -> None:
    """A scale or softcap must stay finite (and a softcap normal) once converted to the compute dtype."""
    info = np.finfo(compute_dtype)
    if abs(value) > float(info.max) or 0 < abs(value) < minimum:
        raise ValueError(
            f"{name}={value!r} is not representable in the compute dtype {compute_dtype} "
            f"(allowed magnitudes: {minimum:g} to {float(info.max):g})"
        )


def _check_devices(arrays: dict[str, Any]) -> None:
    known = {name: device for name, x in arrays.items() if x is not None and (device := device_of(x)) is not None}
    if len(set(known.values())) > 1:
        listing = ", ".join(f"{name} on {device}" for name, device in known.items())
        raise ValueError(f"all arrays must be on one device, got {listing}")


def _check_frameworks(arrays: dict[str, Any], backend_framework: str | None) -> str:
    frameworks = {}
    for name, x in arrays.items():
        if x is None:
            continue
        framework = framework_of(x)
        if framework is None:
            raise TypeError(
                f"{name} must be an array ({', '.join(FRAMEWORKS)}), got {type(x).__name__}"
            )
        frameworks[name] = framework
    if len(set(frameworks.values())) > 1:
        listing = ", ".join(f"{name} is {fw}" for name, fw in frameworks.items())
        raise TypeError(f"all arrays must come from one framework, got {listing}")
    framework = frameworks[next(iter(arrays))]  # the first array's: q, or the layer's query
    if backend_framework is not None and framework != backend_framework:
        raise TypeError(
            f"the {backend_framework} backend takes {backend_framework} arrays, got {framework} "
            f"arrays (convert them with backend.asarray)"
        )
    return framework


def _check_window(window: Any) -> tuple[int | None, int | None]:
    if window is None:
        return None, None
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"window must be None or a pair (left, right) of ints >= 0 or None, got {window!r}")
    sides: list[int | None] = []
    for side, value in zip(("left", "right"), window, strict=True):
        if value is None:
            sides.append(None)
            continue
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            raise TypeError(f"window {side} must be an int >= 0 or None, got {value!r}")
        if value < 0:
            raise ValueError(
                f"window {side} must be >= 0 or None (unbounded), got {value!r}; "
                "FlashAttention's -1 is None here"
            )
        sides.append(int(value))
    return sides[0], sides[1]


def _check_dropout(dropout_p: Any, dropout_mask: Any) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a real number in [0, 1), got {dropout_p!r}")
    p = float(dropout_p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if p > 0 and dropout_mask is None:
        raise ValueError(
            f"dropout_p={dropout_p!r} needs an explicit boolean dropout_mask (True = keep); "
            "make one with attention_ref.dropout_mask(shape, p, seed)"
        )
    return p


def _check_block(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int or None, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return int(value)


def _check_blocks(block_q: Any, block_k: Any, dense: Any, return_weights: bool, score_mod: bool,
                  default_blocks: tuple[int, int], q_len: int, kv_len: int) -> tuple[int | None, int | None]:
    """rule 19: the tile ``(block_q, block_k)`` of the blocked algorithm, each clipped to ``[1, L]`` and
    ``[1, S]``; ``(None, None)`` for the dense algorithm (``dense=True``, ``return_weights`` or a
    ``score_mod``, rule 22)."""
    block_q, block_k = _check_block("block_q", block_q), _check_block("block_k", block_k)
    dense = _check_flag("dense", dense)
    given = [name for name, b in (("block_q", block_q), ("block_k", block_k)) if b is not None]
    if given and dense:
        raise ValueError(f"{' and '.join(given)} set the blocked algorithm's tile; dense=True takes neither")
    if given and return_weights:
        verb = "apply" if len(given) == 2 else "applies"
        raise ValueError(f"return_weights=True computes the dense weights; {' and '.join(given)} {verb} only "
                         "without it")
    if given and score_mod:
        verb = "apply" if len(given) == 2 else "applies"
        raise ValueError(f"a score_mod runs on the dense logits (rule 22); {' and '.join(given)} {verb} only "
                         "without one")
    if dense or return_weights or score_mod:
        return None, None
    block_q = default_blocks[0] if block_q is None else block_q
    block_k = default_blocks[1] if block_k is None else block_k
    return max(1, min(block_q, q_len)), max(1, min(block_k, kv_len))


#: The blocked algorithm's tile when a backend names none (rule 19).
DEFAULT_BLOCKS = (256, 512)


def validate_attention_args(
    q: Any,
    k: Any,
    v: Any,
    options: AttentionOptions = DEFAULT_OPTIONS,
    *,
    return_weights: Any = False,
    return_lse: Any = False,
    compute_dtype: Any = None,
    block_q: Any = None,
    block_k: Any = None,
    dense: Any = False,
    default_blocks: tuple[int, int] = DEFAULT_BLOCKS,
    backend_framework: str | None = None,
) -> AttentionPlan:
    """Check every argument of ``attention`` (SPEC.md rule 12) and return the plan of the call.

    ``options`` holds the attention keywords (mask, bias, scale, causal, alignment, softcap, window,
    dropout_p, dropout_mask) exactly as the caller passed them; nothing in it is trusted yet.

    ``block_q``, ``block_k`` and ``dense`` choose the algorithm (rule 19); ``default_blocks`` is the
    backend's tile when neither block is given. ``backend_framework`` is the framework of the backend
    that will run the call (None: any). Raises TypeError for a wrong type or dtype and ValueError
    for a wrong shape or value; each message names the argument and, for shapes, the shapes involved.
    """
    mask, bias, dropout_mask = options.mask, options.bias, options.dropout_mask
    scale, causal, alignment, softcap = options.scale, options.causal, options.alignment, options.softcap
    framework = _check_frameworks(
        {"q": q, "k": k, "v": v, "mask": mask, "bias": bias, "dropout_mask": dropout_mask}, backend_framework
    )

    dtypes = {name: dtype_name(x) for name, x in (("q", q), ("k", k), ("v", v))}
    if dtypes["q"] not in FLOATING_DTYPES:
        raise TypeError(
            f"q must have a floating dtype ({', '.join(FLOATING_DTYPES)}), got {dtypes['q']}"
        )
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{name} {dt}" for name, dt in dtypes.items())
        raise TypeError(f"q, k and v must share one dtype, got {listing}")
    dtype = dtypes["q"]

    q_shape, k_shape, v_shape = shape_of(q), shape_of(k), shape_of(v)
    shapes = f"q {_fmt(q_shape)}, k {_fmt(k_shape)}, v {_fmt(v_shape)}"
    if len(q_shape) < 2:
        raise ValueError(f"q must have rank >= 2, (..., L, E), got shape {_fmt(q_shape)}")
    if not len(q_shape) == len(k_shape) == len(v_shape):
        raise ValueError(f"q, k and v must have the same rank, got {shapes}")
    has_head_axis = len(q_shape) >= 3
    if q_shape[:-3] != k_shape[:-3] or q_shape[:-3] != v_shape[:-3]:
        raise ValueError(f"q, k and v must have the same batch dims (all but the last 3), got {shapes}")
    num_q_heads = q_shape[-3] if has_head_axis else 1
    num_kv_heads = k_shape[-3] if has_head_axis else 1
    if has_head_axis and k_shape[-3] != v_shape[-3]:
        raise ValueError(f"k and v must have the same number of heads Hkv, got {shapes}")
    if num_kv_heads < 1:
        raise ValueError(f"k and v must have at least one head, got {shapes}")
    if num_q_heads % num_kv_heads:
        raise ValueError(
            f"the query heads Hq={num_q_heads} must be a multiple of the kv heads "
            f"Hkv={num_kv_heads}, got {shapes}"
        )
    if k_shape[-2] != v_shape[-2]:
        raise ValueError(f"k and v must have the same number of keys S, got {shapes}")
    if q_shape[-1] != k_shape[-1]:
        raise ValueError(f"q and k must have the same head dim E, got {shapes}")
    if q_shape[-1] < 1:
        raise ValueError(f"the head dim E must be at least 1, got {shapes}")

    logits_shape = (*q_shape[:-2], q_shape[-2], k_shape[-2])
    for name, x in (("mask", mask), ("bias", bias), ("dropout_mask", dropout_mask)):
        if x is None:
            continue
        x_dtype = dtype_name(x)
        if name == "mask" and x_dtype != "bool":
            raise TypeError(
                f"mask must be boolean (True = may attend), got {x_dtype}; "
                "pass additive masks as bias"
            )
        if name == "dropout_mask" and x_dtype != "bool":
            raise TypeError(f"dropout_mask must be boolean (True = keep), got {x_dtype}")
        if name == "bias" and x_dtype not in FLOATING_DTYPES:
            hint = "; pass boolean masks as mask" if x_dtype == "bool" else ""
            raise TypeError(
                f"bias must have a floating dtype ({', '.join(FLOATING_DTYPES)}), got {x_dtype}{hint}"
            )
        if not is_broadcastable(shape_of(x), logits_shape):
            raise ValueError(
                f"{name} of shape {_fmt(shape_of(x))} is not broadcastable to the logits shape "
                f"(..., Hq, L, S) = {_fmt(logits_shape)}"
            )

    compute_dtype = _check_compute_dtype(compute_dtype, dtype)
    if bias is not None and dtype_name(bias) == "float64" and compute_dtype == "float32":
        raise TypeError(
            "bias is float64 but the compute dtype is float32, which would round it; "
            "pass compute_dtype='float64' or a float32 (or narrower) bias"
        )
    _check_devices({"q": q, "k": k, "v": v, "mask": mask, "bias": bias, "dropout_mask": dropout_mask})

    resolved_scale = (
        1.0 / math.sqrt(q_shape[-1]) if scale is None else _check_real("scale", scale)
    )
    _check_scalar_range("scale", resolved_scale, compute_dtype)
    if softcap is not None:
        softcap = _check_real("softcap", softcap)
        if softcap <= 0:
            raise ValueError(f"softcap must be positive or None, got {softcap!r}")
        _check_scalar_range("softcap", softcap, compute_dtype, minimum=float(np.finfo(compute_dtype).tiny))
    causal = _check_flag("causal", causal)
    if not isinstance(alignment, str) or alignment not in ALIGNMENTS:
        raise ValueError(f"alignment must be 'top_left' or 'bottom_right', got {alignment!r}")
    window_left, window_right = _check_window(options.window)
    resolved_dropout_p = _check_dropout(options.dropout_p, dropout_mask)
    return_weights = _check_flag("return_weights", return_weights)
    return_lse = _check_flag("return_lse", return_lse)
    check_mod("score_mod", options.score_mod)
    check_mod("mask_mod", options.mask_mod)
    resolved_block_q, resolved_block_k = _check_blocks(block_q, block_k, dense, return_weights,
                                                       options.score_mod is not None, default_blocks,
                                                       q_shape[-2], k_shape[-2])

    return AttentionPlan(
        framework=framework,
        batch_shape=q_shape[:-3],
        has_head_axis=has_head_axis,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        q_len=q_shape[-2],
        kv_len=k_shape[-2],
        head_dim=q_shape[-1],
        value_dim=v_shape[-1],
        dtype=dtype,
        compute_dtype=compute_dtype,
        scale=resolved_scale,
        softcap=softcap,
        causal=causal,
        alignment=alignment,
        has_mask=mask is not None,
        has_bias=bias is not None,
        return_weights=return_weights,
        return_lse=return_lse,
        window_left=window_left,
        window_right=window_right,
        dropout_p=resolved_dropout_p,
        has_dropout_mask=dropout_mask is not None,
        block_q=resolved_block_q,
        block_k=resolved_block_k,
        score_mod=options.score_mod,
    )


def validate_vjp_args(
    q: Any,
    k: Any,
    v: Any,
    d_out: Any,
    options: AttentionOptions = DEFAULT_OPTIONS,
    *,
    compute_dtype: Any = None,
    block_q: Any = None,
    block_k: Any = None,
    dense: Any = False,
    default_blocks: tuple[int, int] = DEFAULT_BLOCKS,
    backend_framework: str | None = None,
) -> AttentionPlan:
    """``validate_attention_args`` for ``attention_vjp``, then ``d_out``: an array of the same
    framework, dtype and device as q, of the output's shape ``(..., Hq, L, Ev)``."""
    plan = validate_attention_args(q, k, v, options, compute_dtype=compute_dtype, block_q=block_q, block_k=block_k,
                                   dense=dense, default_blocks=default_blocks, backend_framework=backend_framework)
    if framework_of(d_out) != plan.framework:
        got = f"a {framework_of(d_out)} array" if framework_of(d_out) else type(d_out).__name__
        raise TypeError(f"d_out must be an array of q's framework, got {got}")
    if dtype_name(d_out) != plan.dtype:
        raise TypeError(f"d_out must have the dtype of q ({plan.dtype}), got {dtype_name(d_out)}")
    if shape_of(d_out) != plan.out_shape:
        raise ValueError(
            f"d_out must have the output's shape (..., Hq, L, Ev) = {_fmt(plan.out_shape)}, "
            f"got {_fmt(shape_of(d_out))}"
        )
    _check_devices({"q": q, "d_out": d_out})
    return plan
