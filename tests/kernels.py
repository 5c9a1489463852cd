"""A catalogue of attention kernels in PyTorch: correct ones and deliberately buggy ones.

The catalogue exists to prove that a kernel checker (``attention_ref.testing.check``) does its job:
it must accept :func:`reference_kernel` and every :func:`tiled_kernel`, and reject every entry of
:data:`BUGGY_KERNELS`. Each buggy kernel is a correct kernel with exactly one plausible real-world
bug, so a rejection can only come from that bug.

Calling convention (the keyword names of SPEC.md)::

    kernel(q, k, v, *, mask=None, bias=None, scale=None, causal=False, alignment="top_left",
           softcap=None, return_weights=False, return_lse=False)

* q ``(B, Hq, L, E)``, k ``(B, Hkv, S, E)``, v ``(B, Hkv, S, Ev)``: torch tensors of one dtype among
  float16, bfloat16, float32 and float64; ``Hq % Hkv == 0`` (query head h uses kv head
  ``h // (Hq // Hkv)``).
* mask: bool, broadcastable to ``(B, Hq, L, S)``, True = may attend. bias: floating, broadcastable to
  ``(B, Hq, L, S)``, may hold -inf.
* ``scale=None`` means ``1/sqrt(E)``; ``softcap=c`` caps the scaled logits ``c * tanh(x / c)``
  before the bias; ``causal`` keeps key j for query i iff ``j <= i + offset``, offset 0
  (``"top_left"``) or ``S - L`` (``"bottom_right"``).
* Computed in float32 for float16/bfloat16 inputs (float64 for float64). Excluded keys get weight
  exactly 0; a fully excluded row (``S = 0`` included) gives out 0, weights 0 and lse -inf.
* Returns ``out`` ``(B, Hq, L, Ev)`` in the input dtype when no return flag is set, else the tuple
  ``(out, weights, lse)`` with None for what was not requested; weights ``(B, Hq, L, S)`` and lse
  ``(B, Hq, L)`` in the compute dtype.

``BUGGY_KERNELS`` maps a name to ``(kernel, supports, description)``. ``supports`` lists the
features (those of ``attention_ref.testing.strategies.KERNEL_FEATURES``) the kernel handles: the
ones needed to observe its bug, plus every other one it handles correctly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

Kernel = Callable[..., Any]

#: Every feature a kernel may support.
ALL_FEATURES = ("mask", "bias", "scale", "causal", "bottom_right", "gqa", "value_dim", "softcap", "lse", "weights")

NEG_INF = -math.inf


# --------------------------------------------------------------------------------------------------
# Helpers shared by the kernels (each one correct).


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _scale(q: torch.Tensor, scale: Any) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _repeat_kv(k: torch.Tensor, v: torch.Tensor, num_q_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GQA: kv head g serves query heads g*group ... (g+1)*group - 1 (repeat_interleave order)."""
    group = num_q_heads // k.shape[-3]
    return k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)


def _logits(q: torch.Tensor, k: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    return torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale


def _softcap(x: torch.Tensor, softcap: Any) -> torch.Tensor:
    return x if softcap is None else float(softcap) * torch.tanh(x / float(softcap))


def _add_bias(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x if bias is None else x + bias.to(x.dtype)


def _positions(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Query indices ``(L, 1)``, key indices ``(1, S)``, L and S of the logits ``x``."""
    length, keys = x.shape[-2], x.shape[-1]
    i = torch.arange(length, device=x.device)[:, None]
    j = torch.arange(keys, device=x.device)[None, :]
    return i, j, length, keys


def _causal_keep(x: torch.Tensor, causal: bool, alignment: str) -> torch.Tensor | None:
    if not causal:
        return None
    i, j, length, keys = _positions(x)
    offset = 0 if alignment == "top_left" else keys - length
    return j <= i + offset


def _allowed(x: torch.Tensor, mask: torch.Tensor | None, keep: torch.Tensor | None) -> torch.Tensor:
    """The attended keys: not a -inf logit, allowed by the mask and by the causal rule."""
    allowed = x != NEG_INF
    if mask is not None:
        allowed = allowed & mask
    if keep is not None:
        allowed = allowed & keep
    return allowed


def _row_max(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``x.amax(dim, keepdim=True)``, -inf along an empty axis."""
    if x.shape[dim] == 0:
        shape = list(x.shape)
        shape[dim] = 1
        return x.new_full(shape, NEG_INF)
    return x.amax(dim=dim, keepdim=True)


def _normalise(masked: torch.Tensor, row_max: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """weights ``exp(x - m) / sum`` and lse ``m + log(sum)``; fully excluded rows give 0 and -inf."""
    row_max = row_max.masked_fill(row_max == NEG_INF, 0)
    unnormalised = torch.exp(masked - row_max)
    total = unnormalised.sum(dim=dim, keepdim=True)
    empty = total == 0
    total = total.masked_fill(empty, 1)
    lse = (row_max + torch.log(total)).masked_fill(empty, NEG_INF)
    return unnormalised / total, lse.squeeze(dim)


def _softmax(x: torch.Tensor, allowed: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Numerically stable softmax over the attended keys: ``(weights, lse)``."""
    masked = x.masked_fill(~allowed, NEG_INF)
    return _normalise(masked, _row_max(masked, dim), dim)


def _results(q: torch.Tensor, v: torch.Tensor, weights: torch.Tensor, lse: torch.Tensor,
             return_weights: bool, return_lse: bool) -> Any:
    """out = weights @ v in the input dtype, packaged as the calling convention says."""
    out = torch.matmul(weights, v.to(weights.dtype)).to(q.dtype)
    return _pack(out, weights, lse, return_weights, return_lse)


def _pack(out: torch.Tensor, weights: torch.Tensor | None, lse: torch.Tensor | None,
          return_weights: bool, return_lse: bool) -> Any:
    if not (return_weights or return_lse):
        return out
    return out, weights if return_weights else None, lse if return_lse else None


# --------------------------------------------------------------------------------------------------
# Correct kernels.


def reference_kernel(q, k, v, *, mask=None, bias=None, scale=None, causal=False, alignment="top_left",
                     softcap=None, return_weights=False, return_lse=False):
    """Correct: materialised logits, stable softmax over the attended keys."""
    dtype = _compute_dtype(q)
    k, v = _repeat_kv(k, v, q.shape[-3])
    x = _add_bias(_softcap(_logits(q, k, _scale(q, scale), dtype), softcap), bias)
    weights, lse = _softmax(x, _allowed(x, mask, _causal_keep(x, causal, alignment)))
    return _results(q, v, weights, lse, return_weights, return_lse)


def _tiled(tile_size: int, *, rescale_accumulator: bool = True, keep_partial_tile: bool = True) -> Kernel:
    """A FlashAttention-style kernel over key tiles; the keyword switches exist only to plant bugs."""
    if tile_size < 1:
        raise ValueError(f"tile_size must be >= 1, got {tile_size}")

    def kernel(q, k, v, *, mask=None, bias=None, scale=None, causal=False, alignment="top_left",
               softcap=None, return_weights=False, return_lse=False):
        dtype = _compute_dtype(q)
        k, v = _repeat_kv(k, v, q.shape[-3])
        length, keys = q.shape[-2], k.shape[-2]
        shape = (*q.shape[:-1], keys)
        mask = None if mask is None else mask.broadcast_to(shape)
        bias = None if bias is None else bias.broadcast_to(shape)
        s = _scale(q, scale)
        query = torch.arange(length, device=q.device)[:, None]
        offset = 0 if alignment == "top_left" else keys - length

        def tile_logits(start: int, stop: int) -> torch.Tensor:
            """The final logits of keys start..stop-1, -inf where excluded."""
            x = _softcap(_logits(q, k[..., start:stop, :], s, dtype), softcap)
            if bias is not None:
                x = x + bias[..., start:stop].to(dtype)
            allowed = x != NEG_INF
            if mask is not None:
                allowed = allowed & mask[..., start:stop]
            if causal:
                allowed = allowed & (torch.arange(start, stop, device=q.device) <= query + offset)
            return x.masked_fill(~allowed, NEG_INF)

        end = keys if keep_partial_tile else keys - keys % tile_size
        tiles = [(start, min(start + tile_size, keys)) for start in range(0, end, tile_size)]
        row_max = torch.full((*q.shape[:-1], 1), NEG_INF, dtype=dtype, device=q.device)
        total = torch.zeros_like(row_max)
        acc = torch.zeros((*q.shape[:-1], v.shape[-1]), dtype=dtype, device=q.device)
        for start, stop in tiles:
            x = tile_logits(start, stop)
            new_max = torch.maximum(row_max, x.amax(dim=-1, keepdim=True))
            safe_max = new_max.masked_fill(new_max == NEG_INF, 0)
            alpha = torch.exp(row_max - safe_max)  # 0 while nothing was attended yet
            p = torch.exp(x - safe_max)
            total = total * alpha + p.sum(dim=-1, keepdim=True)
            if rescale_accumulator:
                acc = acc * alpha
            acc = acc + torch.matmul(p, v[..., start:stop, :].to(dtype))
            row_max = new_max

        empty = total == 0  # no key attended: row_max is still -inf
        safe_total = total.masked_fill(empty, 1)
        safe_max = row_max.masked_fill(empty, 0)
        out = (acc / safe_total).to(q.dtype)
        lse = (safe_max + torch.log(safe_total)).masked_fill(empty, NEG_INF).squeeze(-1)
        weights = None
        if return_weights:  # a second pass over the tiles with the final max and sum
            weights = torch.zeros(shape, dtype=dtype, device=q.device)
            for start, stop in tiles:
                weights[..., start:stop] = torch.exp(tile_logits(start, stop) - safe_max) / safe_total
        return _pack(out, weights, lse, return_weights, return_lse)

    kernel.__name__ = kernel.__qualname__ = f"tiled_kernel_{tile_size}"
    return kernel


def tiled_kernel(tile_size: int) -> Kernel:
    """Correct: FlashAttention-style loop over tiles of ``tile_size`` keys with an online softmax
    (running max, running sum, accumulator rescaled when the max grows), fp32 accumulation."""
    return _tiled(tile_size)


# --------------------------------------------------------------------------------------------------
# Buggy kernels: each is reference_kernel (or the tiled kernel) with one bug, marked "# BUG".


def missing_scale(q, k, v, *, mask=None, bias=None, scale=None, causal=False, alignment="top_left",
                  softcap=None, return_weights=False, return_lse=False):
    dtype = _compute_dtype(q)
    k, v = _repeat_kv(k, v, q.shape[-3])
    x = _add_bias(_softcap(_logits(q, k, 1.0, dtype), softcap), bias)  # BUG: the scale is never applied
    weights, lse = _softmax(x, _allowed(x, mask, _causal_keep(x, causal, alignment)))
    return _results(q, v, weights, lse, return_weights, return_lse)


def scale_from_value_dim(q, k, v, *, mask=None, bias=None, scale=None, causal=False, alignment="top_left",
                         softcap=None, return_weights=False, return_lse=False):
    dtype = _compute_dtype(q)
    k, v = _repeat_kv(k, v, q.shape[-3])
    s = 1.0 / math.sqrt(v.shape[-1]) if scale is None else float(scale)  # BUG: Ev instead of E
    x = _add_bias(_softcap(_logits(q, k, s, dtype), softcap), bias)
    weights, lse = _softmax(x, _allowed(x, mask, _causal_keep(x, causal, alignment)))
    return _results(q, v, weights, lse, return_weights, return_lse)


def scale_applied_twice(q, k, v, *, mask=None, bias=None, scale=None, causal=False, alignment="top_left",
                        softcap=None, return_weights=False, return_lse=False):
    dtype = _compute_dtype(q)
    k, v = _repeat_kv(k, v, q.shape[-3])
    s = _scale(q, scale)
    x = _logits(q, k, s, dtype) * s  # BUG: scaled again (once "in q", once on the logits)
    x = _add_bias(_softcap(x, softcap), bias)
    weights, lse = _softmax(x, _allowed(x, mask, _causal_keep(x, causal, alignment)))
    return _results(q, v, weights, lse, return_weights, return_lse)


def softmax_over_queries(q, k, v, *, mask=None, bias=None, scale=None, causal=False, alignment="top_left",
                         softcap=None, return_weights=False, return_lse=False):
    dtype = _compute_dtype(q)
    k, v = _repeat_kv(k, v, q.shape[-3])
    x = _add_bias(_softcap(_logits(q, k, _scale(q, scale), dtype), softcap), bias)
    allowed = _allowed(x, mask, _causal_keep(x, causal, alignment))
    weights, _ = _softmax(x, allowed, dim=-2)  # BUG: normalised over the query axis
    _, lse = _softmax(x, allowed)
    return _results(q, v, weights, lse, return_weights, return_lse)


def inverted_mask(q, k, v, *, mask=None, bias=None, scale=None, causal=False, alignment="top_left",
                  softcap=None, return_weights=False, return_lse=False):
    dtype = _compute_dtype(q)
    k, v = _repeat_kv(k, v, q.shape[-3])
    x = _add_bias(_softcap(_logits(q, k, _scale(q, scale), dtype), softcap), bias)
    mask = None if mask is None else ~mask  # BUG: reads True as "masked out" (nn.MultiheadAttention style)
    weights, lse = _softmax(x, _allowed(x, mask, _causal_keep(x, causal, alignment)))
    return _results(q, v, weights, lse, return_weights, return_lse)


def _causal_bug(name: str, rule: Callable[[torch.Tensor, torch.Tensor, int, int, str], torch.Tensor]) -> Kernel:
    """reference_kernel with ``keep = rule(i, j, L, S, alignment)`` as its causal rule."""

    def kernel(q, k, v, *, mask=None, bias=None, scale=None, causal=False, alignment="top_left",
               softcap=None, return_weights=False, return_lse=False):
        dtype = _compute_dtype(q)
        k, v = _repeat_kv(k, v, q.shape[-3])
        x = _add_bias(_softcap(_logits(q, k, _scale(q, scale), dtype), softcap), bias)
        i, j, length, keys = _positions(x)
        keep = rule(i, j, length, keys, alignment) if causal else None
        weights, lse = _softmax(x, _allowed(x, mask, keep))
        return _results(q, v, weights, lse, return_weights, return_lse)

    kernel.__name__ = kernel.__qualname__ = name
    return kernel


def _offset(length: int, keys: int, alignment: str) -> int:
    return 0 if alignment == "top_left" else keys - length


# BUG: < instead of <=
causal_strict = _causal_bug("causal_strict", lambda i, j, L, S, a: j < i + _offset(L, S, a))
# BUG: one key past the diagonal
causal_one_key_too_many = _causal_bug("causal_one_key_too_many", lambda i, j, L, S, a: j <= i + _offset(L, S, a) + 1)
# BUG: the offset is always 0
bottom_right_as_top_left = _causal_bug("bottom_right_as_top_left", lambda i, j, L, S, a: j <= i)
# BUG: the offset is always S - L
top_left_as_bottom_right = _causal_bug("top_left_as_bottom_right", lambda i, j, L, S, a: j <= i + S - L)
# BUG: bottom_right offset L - S instead of S - L
bottom_right_offset_negated = _causal_bug(
    "bottom_right_offset_negated", lambda i, j, L, S, a: j <= i + (0 if a == "top_left" else L - S))


def gqa_tile_order(q, k, v, *, mask=None, bias=None, scale=None, causal=False, alignment="top_left",
                   softcap=None, return_weights=False, return_lse=False):
    dtype = _compute_dtype(q)
    group = q.shape[-3] // k.shape[-3]
    k, v = torch.cat([k] * group, dim=-3), torch.cat([v] * group, dim=-3)  # BUG: head h uses kv h % Hkv
    x = _add_bias(_softcap(_logits(q, k, _scale(q, scale), dtype), softcap), bias)
    weights, lse = _softmax(x, _allowed(x, mask, _causal_keep(x, causal, alignment)))
    return _results(q, v, weights, lse, return_weights, return_lse)


def nan_on_fully_masked_rows(q, k, v, *, mask=None, bias=None, scale=None, causal=False, alignment="top_left",
                             softcap=None, return_weights=False, return_lse=False):
    dtype = _compute_dtype(q)
    k, v = _repeat_kv(k, v, q.shape[-3])
    x = _add_bias(_softcap(_logits(q, k, _scale(q, scale), dtype), softcap), bias)
    masked = x.masked_fill(~_allowed(x, mask, _causal_keep(x, causal, alignment)), NEG_INF)
    weights = torch.softmax(masked, dim=-1)  # BUG: a row of -inf gives NaN
    lse = torch.logsumexp(masked, dim=-1)
    return _results(q, v, weights, lse, return_weights, return_lse)


def mean_v_on_fully_masked_rows(q, k, v, *, mask=None, bias=None, scale=None, causal=False,
                                alignment="top_left", softcap=None, return_weights=False, return_lse=False):
    dtype = _compute_dtype(q)
    k, v = _repeat_kv(k, v, q.shape[-3])
    x = _add_bias(_softcap(_logits(q, k, _scale(q, scale), dtype), softcap), bias)
    masked = x.masked_fill(~_allowed(x, mask, _causal_keep(x, causal, alignment)), -1e9)  # BUG: finite fill
    weights, lse = torch.softmax(masked, dim=-1), torch.logsumexp(masked, dim=-1)
    return _results(q, v, weights, lse, return_weights, return_lse)


def no_max_subtraction(q, k, v, *, mask=None, bias=None, scale=None, causal=False, alignment="top_left",
                       softcap=None, return_weights=False, return_lse=False):
    dtype = _compute_dtype(q)
    k, v = _repeat_kv(k, v, q.shape[-3])
    x = _add_bias(_softcap(_logits(q, k, _scale(q, scale), dtype), softcap), bias)
    masked = x.masked_fill(~_allowed(x, mask, _causal_keep(x, causal, alignment)), NEG_INF)
    weights, lse = _normalise(masked, masked.new_zeros((*x.shape[:-1], 1)))  # BUG: exp(x) overflows
    return _results(q, v, weights, lse, return_weights, return_lse)


def row_max_includes_masked_keys(q, k, v, *, mask=None, bias=None, scale=None, causal=False,
                                 alignment="top_left", softcap=None, return_weights=False, return_lse=False):
    dtype = _compute_dtype(q)
    k, v = _repeat_kv(k, v, q.shape[-3])
    x = _add_bias(_softcap(_logits(q, k, _scale(q, scale), dtype), softcap), bias)
    masked = x.masked_fill(~_allowed(x, mask, _causal_keep(x, causal, alignment)), NEG_INF)
    weights, lse = _normalise(masked, _row_max(x))  # BUG: max over all keys, attended or not
    return _results(q, v, weights, lse, return_weights, return_lse)


def bias_times_scale(q, k, v, *, mask=None, bias=None, scale=None, causal=False, alignment="top_left",
                     softcap=None, return_weights=False, return_lse=False):
    dtype = _compute_dtype(q)
    k, v = _repeat_kv(k, v, q.shape[-3])
    s = _scale(q, scale)
    x = _softcap(_logits(q, k, s, dtype), softcap)
    x = x if bias is None else x + bias.to(dtype) * s  # BUG: as if scale * (q.k + bias)
    weights, lse = _softmax(x, _allowed(x, mask, _causal_keep(x, causal, alignment)))
    return _results(q, v, weights, lse, return_weights, return_lse)


def softcap_after_bias(q, k, v, *, mask=None, bias=None, scale=None, causal=False, alignment="top_left",
                       softcap=None, return_weights=False, return_lse=False):
    dtype = _compute_dtype(q)
    k, v = _repeat_kv(k, v, q.shape[-3])
    x = _softcap(_add_bias(_logits(q, k, _scale(q, scale), dtype), bias), softcap)  # BUG: cap after bias
    weights, lse = _softmax(x, _allowed(x, mask, _causal_keep(x, causal, alignment)))
    return _results(q, v, weights, lse, return_weights, return_lse)


def softcap_without_outer_factor(q, k, v, *, mask=None, bias=None, scale=None, causal=False,
                                 alignment="top_left", softcap=None, return_weights=False, return_lse=False):
    dtype = _compute_dtype(q)
    k, v = _repeat_kv(k, v, q.shape[-3])
    x = _logits(q, k, _scale(q, scale), dtype)
    x = x if softcap is None else torch.tanh(x / float(softcap))  # BUG: c * tanh(x / c) without the c
    x = _add_bias(x, bias)
    weights, lse = _softmax(x, _allowed(x, mask, _causal_keep(x, causal, alignment)))
    return _results(q, v, weights, lse, return_weights, return_lse)


tiled_no_rescale = _tiled(32, rescale_accumulator=False)  # BUG: acc not rescaled when the max grows
tiled_drops_last_partial_tile = _tiled(32, keep_partial_tile=False)  # BUG: loops over S // 32 full tiles
tiled_no_rescale.__name__ = tiled_no_rescale.__qualname__ = "tiled_no_rescale"
tiled_drops_last_partial_tile.__name__ = tiled_drops_last_partial_tile.__qualname__ = "tiled_drops_last_partial_tile"


def decode_fast_path_ignores_mask(q, k, v, *, mask=None, bias=None, scale=None, causal=False,
                                  alignment="top_left", softcap=None, return_weights=False, return_lse=False):
    if q.shape[-2] == 1:
        mask = None  # BUG: the single-query (decode) path attends the whole KV cache, padding included
    return reference_kernel(q, k, v, mask=mask, bias=bias, scale=scale, causal=causal, alignment=alignment,
                            softcap=softcap, return_weights=return_weights, return_lse=return_lse)


def output_heads_seq_transposed(q, k, v, *, mask=None, bias=None, scale=None, causal=False,
                                alignment="top_left", softcap=None, return_weights=False, return_lse=False):
    dtype = _compute_dtype(q)
    k, v = _repeat_kv(k, v, q.shape[-3])
    x = _add_bias(_softcap(_logits(q, k, _scale(q, scale), dtype), softcap), bias)
    weights, lse = _softmax(x, _allowed(x, mask, _causal_keep(x, causal, alignment)))
    out = torch.matmul(weights, v.to(dtype)).to(q.dtype)
    out = out.transpose(-2, -3).reshape(out.shape)  # BUG: (B, L, Hq, Ev) memory read as (B, Hq, L, Ev)
    return _pack(out, weights, lse, return_weights, return_lse)


def half_precision_accumulation(q, k, v, *, mask=None, bias=None, scale=None, causal=False,
                                alignment="top_left", softcap=None, return_weights=False, return_lse=False):
    dtype = q.dtype  # BUG: logits, softmax and P.V in float16/bfloat16 for half inputs
    k, v = _repeat_kv(k, v, q.shape[-3])
    x = _add_bias(_softcap(_logits(q, k, _scale(q, scale), dtype), softcap), bias)
    weights, lse = _softmax(x, _allowed(x, mask, _causal_keep(x, causal, alignment)))
    out = torch.matmul(weights, v.to(dtype)).to(q.dtype)
    compute = _compute_dtype(q)
    return _pack(out, weights.to(compute), lse.to(compute), return_weights, return_lse)


def lse_log2(q, k, v, *, mask=None, bias=None, scale=None, causal=False, alignment="top_left",
             softcap=None, return_weights=False, return_lse=False):
    dtype = _compute_dtype(q)
    k, v = _repeat_kv(k, v, q.shape[-3])
    x = _add_bias(_softcap(_logits(q, k, _scale(q, scale), dtype), softcap), bias)
    weights, lse = _softmax(x, _allowed(x, mask, _causal_keep(x, causal, alignment)))
    lse = lse / math.log(2)  # BUG: log2 units (exp2-based kernels), not natural log
    return _results(q, v, weights, lse, return_weights, return_lse)


def lse_missing_row_max(q, k, v, *, mask=None, bias=None, scale=None, causal=False, alignment="top_left",
                        softcap=None, return_weights=False, return_lse=False):
    dtype = _compute_dtype(q)
    k, v = _repeat_kv(k, v, q.shape[-3])
    x = _add_bias(_softcap(_logits(q, k, _scale(q, scale), dtype), softcap), bias)
    masked = x.masked_fill(~_allowed(x, mask, _causal_keep(x, causal, alignment)), NEG_INF)
    row_max = _row_max(masked)
    weights, _ = _normalise(masked, row_max)
    p = torch.exp(masked - row_max.masked_fill(row_max == NEG_INF, 0))
    lse = torch.log(p.sum(dim=-1))  # BUG: log of the running sum, the row max never added back
    return _results(q, v, weights, lse, return_weights, return_lse)


def lse_zero_on_fully_masked_rows(q, k, v, *, mask=None, bias=None, scale=None, causal=False,
                                  alignment="top_left", softcap=None, return_weights=False, return_lse=False):
    dtype = _compute_dtype(q)
    k, v = _repeat_kv(k, v, q.shape[-3])
    x = _add_bias(_softcap(_logits(q, k, _scale(q, scale), dtype), softcap), bias)
    masked = x.masked_fill(~_allowed(x, mask, _causal_keep(x, causal, alignment)), NEG_INF)
    row_max = _row_max(masked)
    row_max = row_max.masked_fill(row_max == NEG_INF, 0)
    p = torch.exp(masked - row_max)
    total = p.sum(dim=-1, keepdim=True)
    total = total.masked_fill(total == 0, 1)
    weights = p / total
    lse = (row_max + torch.log(total)).squeeze(-1)  # BUG: the guarded max and sum give 0, not -inf
    return _results(q, v, weights, lse, return_weights, return_lse)


def weights_unnormalised(q, k, v, *, mask=None, bias=None, scale=None, causal=False, alignment="top_left",
                         softcap=None, return_weights=False, return_lse=False):
    dtype = _compute_dtype(q)
    k, v = _repeat_kv(k, v, q.shape[-3])
    x = _add_bias(_softcap(_logits(q, k, _scale(q, scale), dtype), softcap), bias)
    masked = x.masked_fill(~_allowed(x, mask, _causal_keep(x, causal, alignment)), NEG_INF)
    row_max = _row_max(masked)
    weights, lse = _normalise(masked, row_max)
    out = torch.matmul(weights, v.to(dtype)).to(q.dtype)
    p = torch.exp(masked - row_max.masked_fill(row_max == NEG_INF, 0))
    return _pack(out, p, lse, return_weights, return_lse)  # BUG: exp(x - max) returned, not / sum


def mask_only_first_batch(q, k, v, *, mask=None, bias=None, scale=None, causal=False, alignment="top_left",
                          softcap=None, return_weights=False, return_lse=False):
    dtype = _compute_dtype(q)
    k, v = _repeat_kv(k, v, q.shape[-3])
    x = _add_bias(_softcap(_logits(q, k, _scale(q, scale), dtype), softcap), bias)
    if mask is not None:
        mask = mask.broadcast_to(x.shape).clone()
        mask[1:] = True  # BUG: the mask of batch element 0 only (e.g. a [0] index left in)
    weights, lse = _softmax(x, _allowed(x, mask, _causal_keep(x, causal, alignment)))
    return _results(q, v, weights, lse, return_weights, return_lse)


# --------------------------------------------------------------------------------------------------
# The catalogue.


class BuggyKernel(NamedTuple):
    kernel: Kernel
    supports: tuple[str, ...]
    description: str


BUGGY_KERNELS: dict[str, BuggyKernel] = {
    entry[0].__name__: BuggyKernel(*entry)
    for entry in [
        (missing_scale, ALL_FEATURES, "never multiplies the logits by the scale (neither 1/sqrt(E) nor an explicit one)"),
        (scale_from_value_dim, ALL_FEATURES, "default scale 1/sqrt(Ev) instead of 1/sqrt(E): seen only when E != Ev"),
        (scale_applied_twice, ALL_FEATURES, "multiplies by the scale twice (scale**2 * q.k)"),
        (softmax_over_queries, ALL_FEATURES, "softmax over the query axis instead of the key axis (weights and out)"),
        (inverted_mask, ALL_FEATURES, "reads the boolean mask as True = masked out"),
        (causal_strict, ALL_FEATURES, "causal keeps j < i + offset: each query loses its diagonal key"),
        (causal_one_key_too_many, ALL_FEATURES, "causal keeps j <= i + offset + 1: each query sees one future key"),
        (bottom_right_as_top_left, ALL_FEATURES, "ignores alignment: bottom_right is computed as top_left (offset 0)"),
        (top_left_as_bottom_right, ALL_FEATURES, "ignores alignment: top_left is computed as bottom_right (S - L)"),
        (bottom_right_offset_negated, ALL_FEATURES, "bottom_right offset L - S instead of S - L"),
        (gqa_tile_order, ALL_FEATURES, "GQA query head h uses kv head h % Hkv (tile order), not h // (Hq/Hkv)"),
        (nan_on_fully_masked_rows, ALL_FEATURES, "naive softmax: a fully excluded row gives NaN"),
        (mean_v_on_fully_masked_rows, ALL_FEATURES,
         "masks with a finite fill (-1e9): a fully excluded row gives mean(V), uniform weights, a finite lse"),
        (no_max_subtraction, ALL_FEATURES,
         "softmax without subtracting the row max: exp overflows (NaN) or underflows for large logits"),
        (row_max_includes_masked_keys, ALL_FEATURES,
         "row max over all keys, excluded ones included: a large excluded logit underflows the row"),
        (bias_times_scale, ALL_FEATURES, "the bias is multiplied by the scale (as in scale * (q.k + bias))"),
        (softcap_after_bias, ALL_FEATURES, "softcap applied after adding the bias (a -inf bias becomes -softcap)"),
        (softcap_without_outer_factor, ALL_FEATURES, "softcap as tanh(x / c), missing the outer factor c"),
        (tiled_no_rescale, ALL_FEATURES,
         "tile 32, the output accumulator is not rescaled when the running max grows: seen only for S > 32"),
        (tiled_drops_last_partial_tile, ALL_FEATURES,
         "tile 32, loops over S // 32 full tiles and drops the last partial tile: seen when S % 32 != 0"),
        (decode_fast_path_ignores_mask, ALL_FEATURES, "a fast path for L == 1 (decode) that ignores the mask"),
        (output_heads_seq_transposed, ALL_FEATURES,
         "output computed as (B, L, Hq, Ev) and reshaped (not transposed) to (B, Hq, L, Ev): seen when L, Hq > 1"),
        (half_precision_accumulation, ALL_FEATURES,
         "logits, softmax and P.V in float16/bfloat16 instead of float32: only observable in half precision"),
        (lse_log2, ALL_FEATURES, "lse in log2 units (lse / ln 2), as exp2-based kernels keep it"),
        (lse_missing_row_max, ALL_FEATURES, "lse = log(sum exp(x - m)): the row max is never added back"),
        (lse_zero_on_fully_masked_rows, ALL_FEATURES, "lse 0 instead of -inf on fully excluded rows"),
        (weights_unnormalised, ALL_FEATURES, "returned weights are exp(x - max), not divided by the row sum"),
        (mask_only_first_batch, ALL_FEATURES, "the mask is applied to batch element 0 only"),
    ]
}

#: The correct kernels: the reference and the tiled kernel at several tile sizes.
CORRECT_KERNELS: dict[str, Kernel] = {
    "reference": reference_kernel,
    **{f"tiled_{t}": tiled_kernel(t) for t in (1, 16, 32, 64)},
}
