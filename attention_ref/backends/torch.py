"""The PyTorch backend: SPEC.md in torch ops, on the device of the input tensors.

On CUDA, float32 matmuls run as IEEE float32 for the duration of the call (TF32 off), whatever the
process-wide setting; the setting is restored afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

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


class TorchBackend(Backend):
    name = "torch"
    framework = "torch"

    def _attention(
        self, plan: AttentionPlan, q: Any, k: Any, v: Any, mask: Any, bias: Any, dropout_mask: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with ieee_float32_matmul(q.device):
            return self._compute(plan, q, k, v, mask, bias, dropout_mask)

    def _attention_vjp(
        self, plan: AttentionPlan, q: Any, k: Any, v: Any, mask: Any, bias: Any, dropout_mask: Any, d_out: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """torch.autograd through the forward pass (inputs detached, so the caller's graph is untouched)."""
        inputs = [x.detach().requires_grad_() for x in (q, k, v)]
        if bias is not None:
            inputs.append(bias.detach().requires_grad_())
        with ieee_float32_matmul(q.device), torch.enable_grad():
            out = self._compute(plan, *inputs[:3], mask, inputs[3] if bias is not None else None, dropout_mask)[0]
            grads = torch.autograd.grad(out, inputs, d_out, allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]
        return grads[0], grads[1], grads[2], grads[3] if bias is not None else None

    @staticmethod
    def _compute(
        plan: AttentionPlan, q: Any, k: Any, v: Any, mask: Any, bias: Any, dropout_mask: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        compute = getattr(torch, plan.compute_dtype)
        device = q.device
        lead, hkv, group = plan.batch_shape, plan.num_kv_heads, plan.group_size
        length, keys = plan.q_len, plan.kv_len
        grouped = (*lead, hkv, group, length, keys)  # GQA: q head h = kv head h // group

        # The query heads of one kv head are stacked along the query axis: one matmul per kv head.
        q4 = q.to(compute).reshape(*lead, hkv, group * length, plan.head_dim)
        k4 = k.to(compute).reshape(*lead, hkv, keys, plan.head_dim)
        v4 = v.to(compute).reshape(*lead, hkv, keys, plan.value_dim)

        scale = torch.tensor(plan.scale, dtype=compute, device=device)
        logits = torch.matmul(q4, k4.transpose(-1, -2)).reshape(grouped) * scale
        if plan.softcap is not None:
            cap = torch.tensor(plan.softcap, dtype=compute, device=device)
            logits = cap * torch.tanh(logits / cap)
        if bias is not None:
            logits = logits + bias.to(compute).broadcast_to(plan.logits_shape).reshape(grouped)

        allowed = logits != -torch.inf
        if mask is not None:
            allowed = allowed & mask.broadcast_to(plan.logits_shape).reshape(grouped)
        low, high = plan.key_range
        key_minus_query = torch.arange(keys, device=device) - torch.arange(length, device=device)[:, None]
        if low is not None:
            allowed = allowed & (key_minus_query >= low)
        if high is not None:
            allowed = allowed & (key_minus_query <= high)

        masked = logits.masked_fill(~allowed, -torch.inf)
        if keys:
            row_max = masked.detach().amax(dim=-1, keepdim=True)  # softmax does not depend on it
        else:
            row_max = masked.new_full((*grouped[:-1], 1), -torch.inf)
        row_max = row_max.masked_fill(row_max == -torch.inf, 0)
        unnormalized = torch.exp(masked - row_max)
        denominator = unnormalized.sum(dim=-1, keepdim=True)
        fully_excluded = denominator == 0
        safe_denominator = denominator.masked_fill(fully_excluded, 1)
        weights = unnormalized / safe_denominator
        lse = (row_max + torch.log(safe_denominator)).masked_fill(fully_excluded, -torch.inf)

        dropped = weights
        if dropout_mask is not None:
            keep = dropout_mask.broadcast_to(plan.logits_shape).reshape(grouped)
            dropped = weights * torch.where(keep, torch.tensor(plan.dropout_scale, dtype=compute, device=device),
                                            torch.tensor(0, dtype=compute, device=device))
        out = torch.matmul(dropped.reshape(*lead, hkv, group * length, keys), v4).to(q.dtype)
        return (
            out.reshape(plan.out_shape),
            weights.reshape(plan.logits_shape),
            lse.reshape(plan.lse_shape),
        )

    def asarray(self, x: np.ndarray) -> torch.Tensor:
        x = np.array(x, copy=True, order="C")  # owned and writable: torch cannot wrap read-only views
        if x.dtype.name == "bfloat16":
            return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(x)

    def to_numpy(self, x: torch.Tensor) -> np.ndarray:
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            import ml_dtypes

            return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()
