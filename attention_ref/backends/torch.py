"""The PyTorch backend: SPEC.md in torch ops, on the device of the input tensors; gradients by
``torch.autograd`` through the forward pass (rule 14).

Shape letters: B... batch dims, Hq query heads, Hkv kv heads, G = Hq // Hkv query heads per kv head,
L queries, S keys, E q/k head dim, Ev value head dim. The steps work on the grouped layout of
``AttentionPlan`` (rule 2): q ``(*B, Hkv, G, L, E)``, k ``(*B, Hkv, S, E)``, v ``(*B, Hkv, S, Ev)``,
logits, mask, bias and dropout mask ``(*B, Hkv, G, L, S)``, lse ``(*B, Hkv, G, L)``.

Dtypes: q, k, v are float16, bfloat16, float32 or float64, converted exactly to the compute dtype
(float32 or float64, rule 10) in which every step runs; out, dq, dk and dv are rounded to the input
dtype, weights and lse stay in the compute dtype, dbias is in bias's dtype. On CUDA, float32 matmuls
run as IEEE float32 for the duration of the call (TF32 off), whatever the process-wide setting, which
is restored afterwards.

The numpy and jax backends have the same steps under the same names: ``grouped_inputs``,
``grouped_view``, ``logits``, ``allowed_keys``, ``softmax``, ``dropout``, ``results``, ``forward``
and ``attention_backward``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from functools import partial
from typing import Any

import numpy as np
import torch

from ..layers.params import MHAParams
from ..layers.plan import LayerPlan
from ..mods import scored
from ..plan import AttentionPlan
from .base import Backend


@contextlib.contextmanager
def ieee_float32_matmul(device: torch.device) -> Iterator[None]:
    """Disable TF32 for CUDA matmuls inside the block (no-op on other devices)."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    setting, ieee = ("fp32_precision", "ieee") if hasattr(matmul, "fp32_precision") else ("allow_tf32", False)
    previous = getattr(matmul, setting)
    setattr(matmul, setting, ieee)
    try:
        yield
    finally:
        setattr(matmul, setting, previous)


def grouped_inputs(
    plan: AttentionPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q ``(*B, Hq, L, E)`` as ``(*B, Hkv, G, L, E)``, k as ``(*B, Hkv, S, E)`` and v as
    ``(*B, Hkv, S, Ev)`` (rank-2 inputs gain their one head), in the compute dtype."""
    compute = getattr(torch, plan.compute_dtype)
    q, k, v = (x.to(compute) for x in (q, k, v))  # rule 10: exact, every step runs in the compute dtype
    k = k.reshape(plan.kv_shape(plan.head_dim))  # rule 1: heads first, a rank-2 input is one head
    v = v.reshape(plan.kv_shape(plan.value_dim))
    return q.reshape(plan.grouped_shape(plan.head_dim)), k, v  # rule 2: query head h uses kv head h // G


def grouped_view(plan: AttentionPlan, x: torch.Tensor | None) -> torch.Tensor | None:
    """A mask, bias or dropout mask broadcastable to ``(*B, Hq, L, S)``, as ``(*B, Hkv, G, L, S)``;
    None stays None."""
    if x is None:
        return None
    return x.broadcast_to(plan.logits_shape).reshape(plan.grouped_logits_shape)  # rule 2: h // G


def _int32_arange(device: torch.device, n: int) -> torch.Tensor:
    """The index arrays of rule 22's mods: int32 on the logits' device, as FlexAttention's."""
    return torch.arange(n, dtype=torch.int32, device=device)


def logits(
    plan: AttentionPlan, q: torch.Tensor, k: torch.Tensor, softcap: torch.Tensor | None, bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The logits ``(*B, Hkv, G, L, S)`` of q ``(*B, Hkv, G, L, E)`` and k ``(*B, Hkv, S, E)``:
    scaled by ``plan.scale`` (rounded to the compute dtype by the matmul that applies it), modified by
    ``plan.score_mod`` (rule 22), capped
    (softcap None: no cap) and biased (bias ``(*B, Hkv, G, L, S)`` or None). softcap and bias are in
    the compute dtype. Also returns ``tanh(raw / softcap)`` (None without a softcap), which autograd
    differentiates."""
    # rule 10: the matmul runs in the compute dtype; the G query heads of a kv head share one matmul
    heads = math.prod(plan.batch_shape) * plan.num_kv_heads
    stacked = q.reshape(heads, plan.group_size * plan.q_len, plan.head_dim)
    keys = k.reshape(heads, plan.kv_len, plan.head_dim).transpose(-1, -2)
    raw = torch.baddbmm(q.new_zeros(()), stacked, keys, beta=0, alpha=plan.scale)  # rule 3: scale * (q · k)
    x = raw.reshape(plan.grouped_logits_shape)
    if plan.score_mod is not None:  # rule 22: on the scaled logits, before the softcap
        modded = scored(plan, x, partial(_int32_arange, x.device)).to(x.dtype).broadcast_to(plan.logits_shape)
        x = modded.reshape(plan.grouped_logits_shape)
    capped = None
    if softcap is not None:
        capped = torch.tanh(x / softcap)  # rule 4
        x = softcap * capped
    if bias is not None:
        x = x + bias  # rule 5: after the softcap
    return x, capped


def allowed_keys(
    plan: AttentionPlan, x: torch.Tensor, mask: torch.Tensor | None, key_range: tuple[Any, Any]
) -> torch.Tensor | None:
    """Boolean, broadcastable to ``(*B, Hkv, G, L, S)``: the keys mask, causal and window let each
    query attend; None when they let every key. A -inf logit excludes its key too (rule 8) and needs
    no entry here: it is -inf already. x the logits, mask ``(*B, Hkv, G, L, S)`` or None,
    ``key_range = (low, high)`` as ``plan.key_range`` (query i may attend key j only if
    ``low <= j - i <= high``; None: unbounded)."""
    allowed = mask  # rule 6
    low, high = key_range  # rule 7: causal and window, combined by plan.key_range
    if low is None and high is None:
        return allowed
    key_minus_query = torch.arange(plan.kv_len, device=x.device) - torch.arange(plan.q_len, device=x.device)[:, None]
    band = (key_minus_query >= (-plan.q_len if low is None else low)) & (
        key_minus_query <= (plan.kv_len if high is None else high))  # j - i lies in [-L, S]: None is unbounded
    return band if allowed is None else allowed & band
    return allowed


def softmax(x: torch.Tensor, allowed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """weights ``(..., L, S)`` and lse ``(..., L)`` of the logits x ``(..., L, S)`` over the keys
    ``allowed`` (broadcastable to x; None: every key) and whose logit is not -inf (rule 8); the row
    max is a constant for autograd (the softmax does not depend on it)."""
    masked = x if allowed is None else x.masked_fill(~allowed, -torch.inf)
    if masked.shape[-1]:
        row_max = masked.detach().amax(dim=-1, keepdim=True)  # rule 9: over attended keys only
    else:
        row_max = masked.new_full((*masked.shape[:-1], 1), -torch.inf)
    row_max = row_max.masked_fill(row_max == -torch.inf, 0)
    unnormalized = (masked - row_max).exp_()  # rule 9: the row max subtracted
    denominator = unnormalized.sum(dim=-1, keepdim=True)
    fully_excluded = denominator == 0  # rule 8: weights 0 and lse -inf
    safe_denominator = denominator.masked_fill(fully_excluded, 1)
    weights = unnormalized / safe_denominator
    lse = (row_max + torch.log(safe_denominator)).masked_fill(fully_excluded, -torch.inf)
    return weights, lse[..., 0]


def dropout(
    weights: torch.Tensor, keep: torch.Tensor | None, dropout_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(dropped, multiplier)``: the weights ``(..., L, S)`` times ``multiplier = keep / (1 - p)``
    (keep broadcastable to them; dropout_scale ``1 / (1 - p)`` in the compute dtype). Without a keep
    mask, the weights themselves and None."""
    if keep is None:
        return weights, None
    zero = torch.tensor(0, dtype=weights.dtype, device=weights.device)
    multiplier = torch.where(keep, dropout_scale, zero)  # rule 13: keep / (1 - p)
    return weights * multiplier, multiplier


def results(
    plan: AttentionPlan, p: torch.Tensor, v: torch.Tensor, weights: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, weights, lse)`` in the plan's shapes, from the grouped (dropped) probabilities p and
    the weights ``(*B, Hkv, G, L, S)``, v ``(*B, Hkv, S, Ev)`` and lse ``(*B, Hkv, G, L)``: out
    ``(*B, Hq, L, Ev)`` in the input dtype, weights and lse in the compute dtype."""
    out = torch.matmul(p.reshape(plan.stacked_shape(plan.kv_len)), v)  # rule 11: out = P·V, compute dtype
    return (
        out.to(getattr(torch, plan.dtype)).reshape(plan.out_shape),  # rule 11: rounded to the input dtype
        weights.reshape(plan.logits_shape),  # rule 1: the layout of the inputs
        lse.reshape(plan.lse_shape),
    )


def forward(
    plan: AttentionPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
    bias: torch.Tensor | None, dropout_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPEC.md's forward pass for a validated plan: ``results`` of q, k, v, mask, bias and
    dropout_mask as given to ``attention`` (None when absent); differentiable by autograd."""
    compute, device = getattr(torch, plan.compute_dtype), q.device
    q, k, v = grouped_inputs(plan, q, k, v)
    softcap = None if plan.softcap is None else torch.tensor(plan.softcap, dtype=compute, device=device)
    biased = None if bias is None else grouped_view(plan, bias.to(compute))  # rule 5: converted exactly
    x, _ = logits(plan, q, k, softcap, biased)
    allowed = allowed_keys(plan, x, grouped_view(plan, mask), plan.key_range)
    weights, lse = softmax(x, allowed)
    dropout_scale = torch.tensor(plan.dropout_scale, dtype=compute, device=device)
    dropped, _ = dropout(weights, grouped_view(plan, dropout_mask), dropout_scale)
    return results(plan, dropped, v, weights, lse)


def attention_backward(
    plan: AttentionPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
    bias: torch.Tensor | None, dropout_mask: torch.Tensor | None, d_out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(dq, dk, dv, dbias)``: the gradients of ``sum(out * d_out)``, d_out ``(*B, Hq, L, Ev)``, by
    torch.autograd through ``forward`` (inputs detached, so the caller's graph is untouched). dq, dk,
    dv have the shapes and dtype of q, k, v; dbias (None without a bias) bias's shape and dtype."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    bias = None if bias is None else bias.detach().requires_grad_()
    inputs = [q, k, v] if bias is None else [q, k, v, bias]
    with torch.enable_grad():  # rule 14: autograd through the forward pass
        out = forward(plan, q, k, v, mask, bias, dropout_mask)[0]
        grads = torch.autograd.grad(out, inputs, d_out, allow_unused=True)
    dq, dk, dv, *d_bias = (torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads, strict=True))
    return dq, dk, dv, d_bias[0] if d_bias else None


# ---- the multi-head attention layer (rules 15-18) -------------------------------------------------


def layer_mask(plan: LayerPlan, mask: torch.Tensor | None,
               key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The per-head attention's mask: mask (broadcastable to ``(*B, H, L, S)``) and the key padding
    mask ``(*B, S)`` (True = a real token) combined by intersection; None when both are None."""
    if key_padding_mask is None:
        return mask
    padding = key_padding_mask.broadcast_to(plan.padding_shape).reshape(plan.key_padding_shape)  # rule 16
    return padding if mask is None else mask & padding


def project_inputs(plan: LayerPlan, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   params: MHAParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q ``(*B, H, L, hd)``, k ``(*B, Hkv, S, hd)``, v ``(*B, Hkv, S, hd_v)`` in the compute dtype."""
    compute = getattr(torch, plan.compute_dtype)
    projected = []
    for x, w, b in ((query, params.wq, params.bq), (key, params.wk, params.bk), (value, params.wv, params.bv)):
        y = torch.einsum("...ld,dhk->...hlk", x.to(compute), w.to(compute))  # rule 15, rule 17
        projected.append(y if b is None else y + b.to(compute)[:, None, :])
    return projected[0], projected[1], projected[2]


def project_output(plan: LayerPlan, o: torch.Tensor, params: MHAParams) -> torch.Tensor:
    """out ``(*B, L, d_out)`` of the per-head attention's o ``(*B, H, L, hd_v)`` (compute dtype),
    rounded once to the layer's dtype."""
    compute = getattr(torch, plan.compute_dtype)
    out = torch.einsum("...hlv,hvo->...lo", o, params.wo.to(compute))  # rule 15
    if params.bo is not None:
        out = out + params.bo.to(compute)
    return out.to(getattr(torch, plan.dtype))  # rule 17: rounded once, at the end


def layer_forward(
    plan: LayerPlan, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, params: MHAParams,
    mask: torch.Tensor | None, bias: torch.Tensor | None, dropout_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, weights, lse)``: out ``(*B, L, d_out)`` in the layer's dtype; per-head weights
    ``(*B, H, L, S)`` (before dropout) and lse ``(*B, H, L)`` in the compute dtype; differentiable
    by autograd."""
    q, k, v = project_inputs(plan, query, key, value, params)
    o, weights, lse = forward(plan.attention, q, k, v, mask, bias, dropout_mask)  # rule 15: attention per head
    return project_output(plan, o, params), weights, lse


def layer_backward(
    plan: LayerPlan, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, params: MHAParams,
    mask: torch.Tensor | None, bias: torch.Tensor | None, dropout_mask: torch.Tensor | None, d_out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, MHAParams, torch.Tensor | None]:
    """``(d_query, d_key, d_value, d_params, dbias)`` of ``sum(out * d_out)`` by torch.autograd through
    ``layer_forward`` (rule 18; inputs detached, so the caller's graph is untouched), in the shapes
    and dtypes of the arrays."""
    inputs = [x.detach().requires_grad_() for x in (query, key, value)]
    leaves = MHAParams(*(None if p is None else p.detach().requires_grad_() for p in params))
    biased = None if bias is None else bias.detach().requires_grad_()
    tracked = [*inputs, *(p for p in leaves if p is not None), *([] if biased is None else [biased])]
    with torch.enable_grad():  # rule 18: autograd through the layer
        out = layer_forward(plan, inputs[0], inputs[1], inputs[2], leaves, mask, biased, dropout_mask)[0]
        grads = iter(torch.autograd.grad(out, tracked, d_out, allow_unused=True))
    filled = [torch.zeros_like(x) if (g := next(grads)) is None else g for x in inputs]
    d_params = MHAParams(*(None if p is None else (torch.zeros_like(p) if (g := next(grads)) is None else g)
                           for p in leaves))
    d_bias = None if biased is None else (torch.zeros_like(biased) if (g := next(grads)) is None else g)
    return filled[0], filled[1], filled[2], d_params, d_bias


class TorchBackend(Backend):
    name = "torch"
    framework = "torch"
    #: rule 19's tile when a call names none, chosen by measurement on a 2-core CPU against torch SDPA
    #: (whose CPU kernel splits 256 queries by 512 keys too): at (1, 8, 4096, 4096, 64), tiles from
    #: 128 x 256 to 512 x 1024 were within the noise of one another in float32 (1.3-1.4x SDPA's time);
    #: 256 x 512 was the best in float64 (1.17-1.25x) and as good as any for GQA and causal.
    default_blocks = (256, 512)

    def _attention(
        self, plan: AttentionPlan, q: Any, k: Any, v: Any, mask: Any, bias: Any, dropout_mask: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        # rule 12: the front door (validation.py) has checked every argument before this hook runs
        with ieee_float32_matmul(q.device):  # rule 10: TF32 off on CUDA
            if plan.blocked:  # rule 19: bounded memory, differentiable through BlockedAttention
                from . import torch_blocked  # it imports this module's ieee_float32_matmul
                out, lse = torch_blocked.blocked_attention(plan, q, k, v, mask, bias, dropout_mask)
                return out, None, lse
            return forward(plan, q, k, v, mask, bias, dropout_mask)

    def _attention_vjp(
        self, plan: AttentionPlan, q: Any, k: Any, v: Any, mask: Any, bias: Any, dropout_mask: Any, d_out: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        # rule 12: the front door (validation.py) has checked every argument, d_out included
        with ieee_float32_matmul(q.device):  # rule 10: TF32 off on CUDA
            if plan.blocked:  # rule 19: the FlashAttention-2 backward
                from . import torch_blocked
                return torch_blocked.blocked_backward(plan, q, k, v, mask, bias, dropout_mask, d_out)
            return attention_backward(plan, q, k, v, mask, bias, dropout_mask, d_out)

    def _multi_head_attention(
        self, plan: LayerPlan, query: Any, key: Any, value: Any, params: MHAParams, mask: Any, key_padding_mask: Any,
        bias: Any, dropout_mask: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with ieee_float32_matmul(query.device):  # rule 10: TF32 off on CUDA
            return layer_forward(plan, query, key, value, params, layer_mask(plan, mask, key_padding_mask), bias,
                                 dropout_mask)

    def _multi_head_attention_vjp(
        self, plan: LayerPlan, query: Any, key: Any, value: Any, params: MHAParams, mask: Any, key_padding_mask: Any,
        bias: Any, dropout_mask: Any, d_out: Any,
    ) -> tuple[Any, Any, Any, MHAParams, Any]:
        with ieee_float32_matmul(query.device):  # rule 10: TF32 off on CUDA
            return layer_backward(plan, query, key, value, params, layer_mask(plan, mask, key_padding_mask), bias,
                                  dropout_mask, d_out)

    def asarray(self, x: np.ndarray) -> torch.Tensor:
        x = np.array(x, copy=True, order="C")  # owned and writable: torch cannot wrap read-only views
        if x.dtype.name == "bfloat16":
            return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(x)

    def asarray_like(self, x: np.ndarray, like: Any) -> Any:
        """The NumPy array as a tensor on ``like``'s device."""
        return self.asarray(x).to(like.device)

    def to_numpy(self, x: torch.Tensor) -> np.ndarray:
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            import ml_dtypes

            return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()
