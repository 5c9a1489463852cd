"""Kernels with windows, dropout and their own backward pass: one correct, and deliberately buggy ones.

The catalogue proves that the checker (``attention_ref.testing.check`` with ``"grad"``, ``"window"`` and
``"dropout"``) accepts :func:`reference_kernel_with_backward` and rejects every entry of
:data:`BUGGY_BACKWARD_KERNELS`. Each buggy kernel is the correct one with exactly one plausible bug,
planted through a switch of :func:`make_kernel`.

The kernel follows the calling convention of ``tests/kernels.py`` plus ``window=(left, right)``,
``dropout_p`` and ``dropout_mask`` (True = keep; weights are multiplied by keep / (1 - p) before
P·V, and the returned weights are those before dropout). Its backward pass is a
``torch.autograd.Function`` in the FlashAttention style: it recomputes nothing but keeps P, and
computes dV = (PZ)ᵀ dO, dW = Z (dO Vᵀ), D = rowsum(P dW), dS = P (dW - D), dR = dS (1 - tanh²) under a
softcap, dQ = scale dR K, dK = scale dRᵀ Q, with dK and dV summed over each kv head's query heads.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .kernels import ALL_FEATURES, Kernel

#: Every feature the kernels of this module handle.
ALL_FEATURES_WITH_GRAD = (*ALL_FEATURES, "window", "dropout", "grad", "dbias")

NEG_INF = -math.inf

#: The bug switches of ``make_kernel`` (all False: the correct kernel).
BUGS = (
    "dq_missing_scale",
    "dk_dv_tile_order_groups",
    "probabilities_from_lse_in_backward",
    "backward_without_row_term",
    "softcap_backward_without_derivative",
    "window_left_off_by_one",
    "window_ignores_right",
    "window_always_top_left",
    "dropout_without_rescale",
    "weights_after_dropout",
    "backward_ignores_dropout",
    "dbias_averaged_over_broadcast_dims",
)


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def make_kernel(**bugs: bool) -> Kernel:
    """The kernel with the named bugs of ``BUGS`` planted (none: correct)."""
    unknown = set(bugs) - set(BUGS)
    if unknown:
        raise ValueError(f"unknown bugs {sorted(unknown)}")
    bug = {name: bool(bugs.get(name, False)) for name in BUGS}

    def allowed_positions(length: int, keys: int, causal: bool, alignment: str, window: Any,
                          device: torch.device) -> torch.Tensor:
        i = torch.arange(length, device=device)[:, None]
        j = torch.arange(keys, device=device)[None, :]
        offset = 0 if alignment == "top_left" else keys - length
        allowed = torch.ones((length, keys), dtype=torch.bool, device=device)
        if causal:
            allowed &= j <= i + offset
        if window is not None:
            left, right = window
            window_offset = 0 if bug["window_always_top_left"] else offset
            if left is not None:
                allowed &= j >= i + window_offset - left - (1 if bug["window_left_off_by_one"] else 0)
            if right is not None and not bug["window_ignores_right"]:
                allowed &= j <= i + window_offset + right
        return allowed

    class Attention(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                    mask: torch.Tensor | None, dropout_mask: torch.Tensor | None, scale: float, causal: bool,
                    alignment: str, softcap: float | None, window: Any, dropout_p: float) -> tuple[torch.Tensor, ...]:
            dtype = _compute_dtype(q)
            group = q.shape[-3] // k.shape[-3]
            kr, vr = (x.to(dtype).repeat_interleave(group, dim=-3) for x in (k, v))
            qc = q.to(dtype)
            x = torch.matmul(qc, kr.transpose(-1, -2)) * scale
            t = None
            if softcap is not None:
                t = torch.tanh(x / softcap)
                x = softcap * t
            if bias is not None:
                x = x + bias.to(dtype)
            allowed = x != NEG_INF
            if mask is not None:
                allowed = allowed & mask
            allowed = allowed & allowed_positions(q.shape[-2], k.shape[-2], causal, alignment, window, q.device)
            masked = x.masked_fill(~allowed, NEG_INF)
            if masked.shape[-1]:
                row_max = masked.amax(dim=-1, keepdim=True)
            else:
                row_max = masked.new_full((*masked.shape[:-1], 1), NEG_INF)
            row_max = row_max.masked_fill(row_max == NEG_INF, 0)
            unnormalised = torch.exp(masked - row_max)
            total = unnormalised.sum(dim=-1, keepdim=True)
            empty = total == 0
            total = total.masked_fill(empty, 1)
            p = unnormalised / total
            lse = (row_max + torch.log(total)).masked_fill(empty, NEG_INF)
            z = torch.ones((), dtype=dtype, device=q.device)
            if dropout_mask is not None:
                kept = 1.0 if bug["dropout_without_rescale"] else 1.0 / (1.0 - dropout_p)
                z = torch.where(dropout_mask, torch.tensor(kept, dtype=dtype, device=q.device),
                                torch.tensor(0.0, dtype=dtype, device=q.device))
            pz = p * z
            out = torch.matmul(pz, vr).to(q.dtype)
            ctx.save_for_backward(qc, kr, vr, p, z, masked, lse, t if t is not None else torch.empty(0))
            ctx.meta = (scale, softcap, group, q.dtype, k.dtype, None if bias is None else (bias.shape, bias.dtype))
            weights = pz if bug["weights_after_dropout"] else p
            ctx.mark_non_differentiable(weights, lse)
            return out, weights, lse.squeeze(-1)

        @staticmethod
        def backward(ctx: Any, d_out: torch.Tensor, *unused: Any) -> tuple[Any, ...]:
            qc, kr, vr, p, z, masked, lse, t = ctx.saved_tensors
            scale, softcap, group, q_dtype, kv_dtype, bias_info = ctx.meta
            if bug["probabilities_from_lse_in_backward"]:  # recompute P = exp(x - lse): NaN on fully excluded rows
                p = torch.exp(masked - lse)
            d = d_out.to(qc.dtype)
            pz = p if bug["backward_ignores_dropout"] else p * z
            dv = torch.matmul(pz.transpose(-1, -2), d)
            dw = torch.matmul(d, vr.transpose(-1, -2))
            if not bug["backward_ignores_dropout"]:
                dw = dw * z
            row = 0 if bug["backward_without_row_term"] else (p * dw).sum(dim=-1, keepdim=True)
            ds = p * (dw - row)
            d_bias = None
            if bias_info is not None:  # reduce dS to the bias's own (broadcast) shape
                shape, dtype = bias_info
                reduce = torch.mean if bug["dbias_averaged_over_broadcast_dims"] else torch.sum
                d_bias = ds
                extra = d_bias.dim() - len(shape)
                if extra:
                    d_bias = reduce(d_bias, dim=tuple(range(extra)))
                stretched = tuple(i for i, n in enumerate(shape) if n == 1 and d_bias.shape[i] != 1)
                if stretched:
                    d_bias = reduce(d_bias, dim=stretched, keepdim=True)
                d_bias = d_bias.to(dtype)
            dr = ds
            if softcap is not None and not bug["softcap_backward_without_derivative"]:
                dr = ds * (1 - t * t)
            dq = torch.matmul(dr, kr) * (1.0 if bug["dq_missing_scale"] else scale)
            dk = torch.matmul(dr.transpose(-1, -2), qc) * scale

            def fold(x: torch.Tensor) -> torch.Tensor:  # per query head -> per kv head
                lead, heads = x.shape[:-3], x.shape[-3]
                if bug["dk_dv_tile_order_groups"]:
                    return x.reshape(*lead, group, heads // group, *x.shape[-2:]).sum(dim=-4)
                return x.reshape(*lead, heads // group, group, *x.shape[-2:]).sum(dim=-3)

            return (dq.to(q_dtype), fold(dk).to(kv_dtype), fold(dv).to(kv_dtype), d_bias,
                    None, None, None, None, None, None, None, None)

    def kernel(q, k, v, *, mask=None, bias=None, scale=None, causal=False, alignment="top_left", softcap=None,
               window=None, dropout_p=0.0, dropout_mask=None, return_weights=False, return_lse=False):
        s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        shape = (*q.shape[:-1], k.shape[-2])
        mask, dropout_mask = (None if x is None else x.broadcast_to(shape) for x in (mask, dropout_mask))
        out, weights, lse = Attention.apply(q, k, v, bias, mask, dropout_mask, s, causal, alignment,
                                            None if softcap is None else float(softcap), window, float(dropout_p))
        if not (return_weights or return_lse):
            return out
        return out, weights if return_weights else None, lse if return_lse else None

    kernel.__name__ = "_".join(name for name in BUGS if bug[name]) or "reference_kernel_with_backward"
    return kernel


def reference_kernel_with_backward(q, k, v, **keywords):
    """Correct: windows, dropout and an analytic backward pass (module docstring)."""
    return _REFERENCE(q, k, v, **keywords)


_REFERENCE = make_kernel()

#: name -> (kernel, description)
BUGGY_BACKWARD_KERNELS: dict[str, tuple[Kernel, str]] = {
    "dq_missing_scale": (make_kernel(dq_missing_scale=True), "dq is never multiplied by the scale"),
    "dk_dv_tile_order_groups": (make_kernel(dk_dv_tile_order_groups=True),
                                "dk and dv summed over the wrong GQA group (query heads h % Hkv, tile order)"),
    "probabilities_from_lse_in_backward": (make_kernel(probabilities_from_lse_in_backward=True),
                                           "backward recomputes P = exp(x - lse): NaN gradients through a fully "
                                           "masked row (lse = -inf)"),
    "backward_without_row_term": (make_kernel(backward_without_row_term=True),
                                  "softmax backward without the row term D = rowsum(P dP)"),
    "softcap_backward_without_derivative": (make_kernel(softcap_backward_without_derivative=True),
                                            "softcap backward misses the factor 1 - tanh²"),
    "window_left_off_by_one": (make_kernel(window_left_off_by_one=True),
                               "window keeps one key too many on the left (i + offset - left - 1)"),
    "window_ignores_right": (make_kernel(window_ignores_right=True), "window ignores its right bound"),
    "window_always_top_left": (make_kernel(window_always_top_left=True),
                               "window aligned top-left even when bottom_right is asked"),
    "dropout_without_rescale": (make_kernel(dropout_without_rescale=True),
                                "dropout without the 1 / (1 - p) rescale"),
    "weights_after_dropout": (make_kernel(weights_after_dropout=True),
                              "returned weights are those after dropout"),
    "backward_ignores_dropout": (make_kernel(backward_ignores_dropout=True),
                                 "backward uses P instead of P·keep/(1-p) (dropout forgotten in dv and dP)"),
    "dbias_averaged_over_broadcast_dims": (make_kernel(dbias_averaged_over_broadcast_dims=True),
                                           "dbias averaged, not summed, over the dims the bias was broadcast over"),
}
