"""Score and mask programs (SPEC.md rule 22): the index arrays a ``score_mod`` or ``mask_mod`` is
evaluated on, and the checks of what it returns. Framework-neutral: each backend passes its own
``arange``.

``score_mod(score, b, h, q_idx, kv_idx) -> score`` and ``mask_mod(b, h, q_idx, kv_idx) -> bool`` are
FlexAttention's programs, written in the backend's framework and evaluated once on broadcast integer
index arrays (not element by element): ``b`` the batch element (batch dims flattened row-major, 0
without any), ``h`` the *query* head (0 for rank-2 inputs), ``q_idx`` the query and ``kv_idx`` the key,
each shaped to broadcast against the logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .broadcasting import is_broadcastable
from .frameworks import dtype_name, framework_of, shape_of
from .plan import AttentionPlan

Arange = Callable[[int], Any]


def index_arrays(plan: AttentionPlan, arange: Arange, *, grouped: bool) -> tuple[Any, Any, Any, Any]:
    """``(b, h, q_idx, kv_idx)`` as ``arange``'s integer arrays, broadcastable against the logits
    ``(*B, Hq, L, S)`` (``grouped=False``) or their grouped layout ``(*B, Hkv, G, L, S)``
    (``grouped=True``; h is then ``kv_head * G + g``, the query head of rule 2)."""
    batch = plan.batch_shape if plan.batch_shape else ()
    heads = (plan.num_kv_heads, plan.group_size) if grouped else ((plan.num_q_heads,) if plan.has_head_axis else ())
    b = arange(math.prod(batch)).reshape(*batch, *(1,) * (len(heads) + 2)) if batch else arange(1).reshape(1, 1)
    h = arange(plan.num_q_heads).reshape(*heads, 1, 1) if heads else arange(1).reshape(1, 1)
    return b, h, arange(plan.q_len).reshape(plan.q_len, 1), arange(plan.kv_len)


def check_mod_result(name: str, result: Any, shape: tuple[int, ...], *, boolean: bool, framework: str) -> None:
    """TypeError unless ``result`` (what ``name`` returned) is an array of ``framework`` of booleans
    (``boolean``) or of a floating dtype; ValueError unless it broadcasts to ``shape``."""
    if framework_of(result) != framework:
        got = f"a {framework_of(result)} array" if framework_of(result) else type(result).__name__
        raise TypeError(f"{name} must return an array of the backend's framework ({framework}), got {got}")
    dtype = dtype_name(result)
    if boolean and dtype != "bool":
        raise TypeError(f"mask_mod must return booleans (True = may attend), got {dtype}")
    if not boolean and dtype not in ("float16", "bfloat16", "float32", "float64"):
        raise TypeError(f"score_mod must return floating scores, got {dtype}")
    result_shape = shape_of(result)
    if not is_broadcastable(result_shape, shape):
        raise ValueError(f"{name} returned shape {result_shape}, which does not broadcast to the logits "
                         f"{tuple(shape)}")


def check_mod(name: str, mod: Any) -> None:
    """TypeError unless ``mod`` is None or callable."""
    if mod is not None and not callable(mod):
        raise TypeError(f"{name} must be a callable or None, got {type(mod).__name__}")


def scored(plan: AttentionPlan, x: Any, arange: Arange) -> Any:
    """``plan.score_mod(score, b, h, q_idx, kv_idx)`` (rule 22) with ``score`` the grouped scaled logits x
    ``(*B, Hkv, G, L, S)`` seen in the logits' own shape ``(*B, Hq, L, S)`` (a free reshape: query head
    h = kv head * G + g), checked by ``check_mod_result``: an array broadcastable to ``(*B, Hq, L, S)``.
    The caller broadcasts it to that shape, reshapes it back and converts it to the compute dtype."""
    result = plan.score_mod(x.reshape(plan.logits_shape), *index_arrays(plan, arange, grouped=False))
    check_mod_result("score_mod", result, plan.logits_shape, boolean=False, framework=plan.framework)
    return result


def mask_pattern(plan: AttentionPlan, mask_mod: Callable[..., Any], arange: Arange) -> Any:
    """``mask_mod(b, h, q_idx, kv_idx)`` on the index arrays of the logits ``(*B, Hq, L, S)``: a boolean
    array broadcastable to them (rule 22), checked by ``check_mod_result``."""
    result = mask_mod(*index_arrays(plan, arange, grouped=False))
    check_mod_result("mask_mod", result, plan.logits_shape, boolean=True, framework=plan.framework)
    return result
