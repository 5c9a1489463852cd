"""The zoo's one attention kernel, with every bug of the zoo but the tiled kernel's as a switch.

``make_kernel()`` is the correct kernel; ``make_kernel(name=True)`` plants the bug ``name`` (one of
``KERNEL_BUGS``) in that same code path, so that it differs from the correct kernel in that one
place. Calling convention: the package docstring (``tests/zoo/__init__.py``). The backward pass is a
``torch.autograd.Function`` in the FlashAttention style: it recomputes nothing but keeps P, and
computes dV = (PZ)ᵀ dO, dW = Z (dO Vᵀ), D = rowsum(P dW), dS = P (dW - D), dR = dS (1 - tanh²)
under a softcap, dQ = scale dR K, dK = scale dRᵀ Q (dK and dV summed over each kv head's query
heads), and dbias = dS summed over the dims the bias was broadcast over.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

Kernel = Callable[..., Any]

NEG_INF = -math.inf

#: The bug switches of ``make_kernel`` (none set: the correct kernel). Table: ``tests/zoo/bugs.py``.
KERNEL_BUGS = (
    # scale
    "missing_scale", "scale_from_value_dim", "scale_applied_twice",
    # softmax
    "softmax_over_queries", "nan_on_fully_masked_rows", "mean_v_on_fully_masked_rows", "no_max_subtraction",
    "row_max_includes_masked_keys",
    # mask, causal and window
    "inverted_mask", "mask_only_first_batch", "decode_fast_path_ignores_mask",
    "causal_strict", "causal_one_key_too_many", "bottom_right_as_top_left", "top_left_as_bottom_right",
    "bottom_right_offset_negated",
    "window_left_off_by_one", "window_ignores_right", "window_always_top_left",
    # GQA, bias and softcap
    "gqa_tile_order", "bias_times_scale", "softcap_after_bias", "softcap_without_outer_factor",
    # precision
    "half_precision_accumulation", "float64_computed_in_float32",
    # results
    "output_heads_seq_transposed", "lse_log2", "lse_missing_row_max", "lse_zero_on_fully_masked_rows",
    "weights_unnormalised",
    # dropout
    "dropout_without_rescale", "weights_after_dropout",
    # score and mask programs (rule 22)
    "score_mod_on_unscaled_logits", "score_mod_given_kv_head", "mask_mod_query_key_swapped",
    "partial_blocks_ignore_mask_mod", "score_mod_after_softcap",
    # backward
    "dq_missing_scale", "dk_dv_tile_order_groups", "probabilities_from_lse_in_backward",
    "backward_without_row_term", "softcap_backward_without_derivative", "backward_ignores_dropout",
    "dbias_averaged_over_broadcast_dims",
)


def compute_dtype(q: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, else float32 (float16 and bfloat16 are computed in float32)."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def pack(out: torch.Tensor, weights: torch.Tensor | None, lse: torch.Tensor | None, return_weights: bool,
         return_lse: bool) -> Any:
    """``out`` alone without return flags, else ``(out, weights, lse)`` with None for what was not asked."""
    if not (return_weights or return_lse):
        return out
    return out, weights if return_weights else None, lse if return_lse else None


#: The block size of a block-sparse evaluation of ``mask_mod`` (``partial_blocks_ignore_mask_mod``).
MOD_BLOCK = 4


def mod_indices(q: torch.Tensor, keys: int) -> tuple[torch.Tensor, ...]:
    """``(b, h, q_idx, kv_idx)``: int32 index tensors broadcast against the logits ``(B, Hq, L, S)``, h
    the query head (rule 22)."""
    def arange(n: int) -> torch.Tensor:
        return torch.arange(n, dtype=torch.int32, device=q.device)

    batch, heads, length = q.shape[:-3], q.shape[-3], q.shape[-2]
    flat = arange(math.prod(batch)).reshape(*batch, 1, 1, 1)  # the batch dims flattened row-major
    return flat, arange(heads).reshape(heads, 1, 1), arange(length)[:, None], arange(keys)


def make_kernel(**bugs: bool) -> Kernel:
    """The zoo's kernel with the named bugs of ``KERNEL_BUGS`` planted (none: the correct kernel)."""
    unknown = set(bugs) - set(KERNEL_BUGS)
    if unknown:
        raise ValueError(f"unknown bugs {sorted(unknown)}")
    bug = frozenset(name for name, planted in bugs.items() if planted)

    def positions(length: int, keys: int, causal: bool, alignment: str, window: Any,
                  device: torch.device) -> torch.Tensor:
        """``(L, S)`` bool: the keys the causal rule and the window let query i attend."""
        i = torch.arange(length, device=device)[:, None]
        j = torch.arange(keys, device=device)[None, :]
        offset = 0 if alignment == "top_left" else keys - length
        allowed = torch.ones((length, keys), dtype=torch.bool, device=device)
        if causal:
            causal_offset = offset
            if "bottom_right_as_top_left" in bug:
                causal_offset = 0
            elif "top_left_as_bottom_right" in bug:
                causal_offset = keys - length
            elif "bottom_right_offset_negated" in bug and alignment == "bottom_right":
                causal_offset = length - keys
            if "causal_strict" in bug:
                allowed &= j < i + causal_offset
            elif "causal_one_key_too_many" in bug:
                allowed &= j <= i + causal_offset + 1
            else:
                allowed &= j <= i + causal_offset
        if window is not None:
            left, right = window
            window_offset = 0 if "window_always_top_left" in bug else offset
            if left is not None:
                allowed &= j >= i + window_offset - left - (1 if "window_left_off_by_one" in bug else 0)
            if right is not None and "window_ignores_right" not in bug:
                allowed &= j <= i + window_offset + right
        return allowed

    def normalise(masked: torch.Tensor, logits: torch.Tensor, dim: int) -> tuple[torch.Tensor, ...]:
        """``(P, exp(x - m), lse)`` of the masked logits along ``dim``: 0 and -inf on fully excluded rows."""
        if masked.shape[dim] == 0:
            row_max = masked.new_full((*masked.shape[:dim], 1, *masked.shape[dim:][1:]), NEG_INF)
        elif "row_max_includes_masked_keys" in bug:
            row_max = logits.amax(dim=dim, keepdim=True)
        else:
            row_max = masked.amax(dim=dim, keepdim=True)
        if "no_max_subtraction" in bug:
            row_max = torch.zeros_like(row_max)
        if "nan_on_fully_masked_rows" not in bug:  # the naive softmax: exp(-inf - (-inf)) is NaN
            row_max = row_max.masked_fill(row_max == NEG_INF, 0)
        unnormalised = torch.exp(masked - row_max)
        total = unnormalised.sum(dim=dim, keepdim=True)
        empty = total == 0
        safe_total = total.masked_fill(empty, 1)
        if "lse_missing_row_max" in bug:
            lse = torch.log(total)
        else:
            lse = row_max + torch.log(safe_total)
            if "lse_zero_on_fully_masked_rows" not in bug:
                lse = lse.masked_fill(empty, NEG_INF)
        return unnormalised / safe_total, unnormalised, lse

    class Attention(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                    mask: torch.Tensor | None, dropout_mask: torch.Tensor | None, scale: float, causal: bool,
                    alignment: str, softcap: float | None, window: Any, dropout_p: float,
                    score_mod: Any) -> tuple[torch.Tensor, ...]:
            results = compute_dtype(q)
            dtype = results
            if "half_precision_accumulation" in bug:
                dtype = q.dtype
            elif "float64_computed_in_float32" in bug:
                dtype = torch.float32
            group = q.shape[-3] // k.shape[-3]
            if "gqa_tile_order" in bug:  # query head h reads kv head h % Hkv
                kr, vr = (torch.cat([x.to(dtype)] * group, dim=-3) for x in (k, v))
            else:
                kr, vr = (x.to(dtype).repeat_interleave(group, dim=-3) for x in (k, v))
            qc = q.to(dtype)
            x = torch.matmul(qc, kr.transpose(-1, -2))
            late_mod = score_mod is not None and "score_mod_after_softcap" in bug
            if score_mod is not None and not late_mod:  # rule 22: on the scaled logits
                b_idx, h_idx, q_idx, kv_idx = mod_indices(q, k.shape[-2])
                if "score_mod_given_kv_head" in bug:
                    h_idx = h_idx // group
                if "score_mod_on_unscaled_logits" in bug:
                    x = score_mod(x, b_idx, h_idx, q_idx, kv_idx).to(dtype) * scale
                else:
                    x = score_mod(x * scale, b_idx, h_idx, q_idx, kv_idx).to(dtype)
            else:
                x = x * scale
            b = None
            if bias is not None:
                b = bias.to(dtype) * scale if "bias_times_scale" in bug else bias.to(dtype)
            t = None
            if softcap is not None and "softcap_after_bias" in bug:
                x = x if b is None else x + b
                t = torch.tanh(x / softcap)
                x = softcap * t
            else:
                if softcap is not None:
                    t = torch.tanh(x / softcap)
                    x = t if "softcap_without_outer_factor" in bug else softcap * t
                x = x if b is None else x + b
            if late_mod:  # after the softcap and the bias
                x = score_mod(x, *mod_indices(q, k.shape[-2])).to(dtype)
            allowed = x != NEG_INF
            if mask is not None:
                allowed = allowed & mask
            allowed = allowed & positions(q.shape[-2], k.shape[-2], causal, alignment, window, q.device)
            masked = x.masked_fill(~allowed, -1e9 if "mean_v_on_fully_masked_rows" in bug else NEG_INF)
            p, unnormalised, lse = normalise(masked, x, -1)
            if "softmax_over_queries" in bug:
                p, _, _ = normalise(masked, x, -2)
            if "lse_log2" in bug:
                lse = lse / math.log(2)
            z = torch.ones((), dtype=dtype, device=q.device)
            if dropout_mask is not None:
                kept = 1.0 if "dropout_without_rescale" in bug else 1.0 / (1.0 - dropout_p)
                z = torch.where(dropout_mask, torch.tensor(kept, dtype=dtype, device=q.device),
                                torch.tensor(0.0, dtype=dtype, device=q.device))
            pz = p * z
            out = torch.matmul(pz, vr).to(q.dtype)
            ctx.save_for_backward(qc, kr, vr, p, z, masked, lse, t if t is not None else torch.empty(0))
            ctx.scored = score_mod is not None
            ctx.meta = (scale, softcap, group, q.dtype, k.dtype, None if bias is None else (bias.shape, bias.dtype))
            weights = p
            if "weights_after_dropout" in bug:
                weights = pz
            elif "weights_unnormalised" in bug:
                weights = unnormalised
            weights, lse = weights.to(results), lse.to(results)
            ctx.mark_non_differentiable(weights, lse)
            return out, weights, lse.squeeze(-1)

        @staticmethod
        def backward(ctx: Any, d_out: torch.Tensor, *unused: Any) -> tuple[Any, ...]:
            if ctx.scored:
                raise NotImplementedError("the zoo kernel's backward does not differentiate a score_mod")
            qc, kr, vr, p, z, masked, lse, t = ctx.saved_tensors
            scale, softcap, group, q_dtype, kv_dtype, bias_info = ctx.meta
            if "probabilities_from_lse_in_backward" in bug:  # P = exp(x - lse): NaN on fully excluded rows
                p = torch.exp(masked - lse.to(masked.dtype))
            d = d_out.to(qc.dtype)
            ignores_dropout = "backward_ignores_dropout" in bug
            dv = torch.matmul((p if ignores_dropout else p * z).transpose(-1, -2), d)
            dw = torch.matmul(d, vr.transpose(-1, -2))
            if not ignores_dropout:
                dw = dw * z
            row = 0 if "backward_without_row_term" in bug else (p * dw).sum(dim=-1, keepdim=True)
            ds = p * (dw - row)
            d_bias = None
            if bias_info is not None:  # reduce dS to the bias's own (broadcast) shape
                shape, dtype = bias_info
                reduce = torch.mean if "dbias_averaged_over_broadcast_dims" in bug else torch.sum
                d_bias = ds
                extra = d_bias.dim() - len(shape)
                if extra:
                    d_bias = reduce(d_bias, dim=tuple(range(extra)))
                stretched = tuple(i for i, n in enumerate(shape) if n == 1 and d_bias.shape[i] != 1)
                if stretched:
                    d_bias = reduce(d_bias, dim=stretched, keepdim=True)
                d_bias = d_bias.to(dtype)
            dr = ds
            if softcap is not None and "softcap_backward_without_derivative" not in bug:
                dr = ds * (1 - t * t)
            dq = torch.matmul(dr, kr) * (1.0 if "dq_missing_scale" in bug else scale)
            dk = torch.matmul(dr.transpose(-1, -2), qc) * scale

            def fold(x: torch.Tensor) -> torch.Tensor:  # per query head -> per kv head
                lead, heads = x.shape[:-3], x.shape[-3]
                if "dk_dv_tile_order_groups" in bug:
                    return x.reshape(*lead, group, heads // group, *x.shape[-2:]).sum(dim=-4)
                return x.reshape(*lead, heads // group, group, *x.shape[-2:]).sum(dim=-3)

            return (dq.to(q_dtype), fold(dk).to(kv_dtype), fold(dv).to(kv_dtype), d_bias,
                    None, None, None, None, None, None, None, None, None)

    def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, scale: float | None = None, causal: bool = False,
               alignment: str = "top_left", softcap: float | None = None,
               window: tuple[int | None, int | None] | None = None, dropout_p: float = 0.0,
               dropout_mask: torch.Tensor | None = None, score_mod: Any = None, mask_mod: Any = None,
               return_weights: bool = False, return_lse: bool = False) -> Any:
        if scale is None:
            s = 1.0 / math.sqrt(v.shape[-1] if "scale_from_value_dim" in bug else q.shape[-1])
        else:
            s = float(scale)
        if "missing_scale" in bug:
            s = 1.0
        elif "scale_applied_twice" in bug:  # once "in q", once on the logits
            s = s * s
        shape = (*q.shape[:-1], k.shape[-2])
        if mask is not None:
            mask = mask.broadcast_to(shape)
            if "inverted_mask" in bug:  # True read as "masked out" (nn.MultiheadAttention style)
                mask = ~mask
            elif "mask_only_first_batch" in bug:  # a [0] index left in
                mask = mask.clone()
                mask[1:] = True
            elif "decode_fast_path_ignores_mask" in bug and q.shape[-2] == 1:  # attends the whole KV cache
                mask = None
        if mask_mod is not None:  # rule 22: the program's pattern, intersected with the mask
            b_idx, h_idx, q_idx, kv_idx = mod_indices(q, k.shape[-2])
            if "mask_mod_query_key_swapped" in bug:  # mask_mod(b, h, kv_idx, q_idx)
                pattern = mask_mod(b_idx, h_idx, kv_idx[None, :], q_idx[:, 0][:, None])
            else:
                pattern = mask_mod(b_idx, h_idx, q_idx, kv_idx)
            pattern = pattern.broadcast_to(shape)
            if "partial_blocks_ignore_mask_mod" in bug and pattern.numel():  # blocks taken whole
                blocks = torch.nn.functional.max_pool2d(pattern.flatten(0, 1)[:, None].float(), MOD_BLOCK,
                                                        ceil_mode=True)
                pattern = blocks.repeat_interleave(MOD_BLOCK, -2).repeat_interleave(MOD_BLOCK, -1)[
                    :, 0, : shape[-2], : shape[-1]].reshape(shape) > 0
            mask = pattern if mask is None else mask & pattern
        if dropout_mask is not None:
            dropout_mask = dropout_mask.broadcast_to(shape)
        out, weights, lse = Attention.apply(q, k, v, bias, mask, dropout_mask, s, causal, alignment,
                                            None if softcap is None else float(softcap), window, float(dropout_p),
                                            score_mod)
        if "output_heads_seq_transposed" in bug:  # (B, L, Hq, Ev) memory read as (B, Hq, L, Ev)
            out = out.transpose(-2, -3).reshape(out.shape)
        return pack(out, weights, lse, return_weights, return_lse)

    kernel.__name__ = kernel.__qualname__ = "_".join(name for name in KERNEL_BUGS if name in bug) or "reference_kernel"
    return kernel


#: The correct kernel.
reference_kernel = make_kernel()
