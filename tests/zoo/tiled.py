"""The zoo's FlashAttention-style kernel: an online softmax over tiles of keys, with its two bugs as switches.

``tiled_kernel(tile_size)`` is correct at every tile size (running max, running sum, accumulator
rescaled when the max grows, float32 accumulation for half-precision inputs);
``tiled_kernel(32, name=True)`` plants the bug ``name`` of ``TILED_BUGS``. It takes the forward
keywords of the package's calling convention but ``window`` and the dropout keywords (its
``supports``: ``tests.zoo.bugs.TILED_FEATURES``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .kernel import NEG_INF, Kernel, compute_dtype, pack

#: The bug switches of ``tiled_kernel`` (none set: correct).
TILED_BUGS = ("tiled_no_rescale", "tiled_drops_last_partial_tile")


def tiled_kernel(tile_size: int, **bugs: bool) -> Kernel:
    """The tiled kernel over tiles of ``tile_size`` keys with the named bugs of ``TILED_BUGS``."""
    if tile_size < 1:
        raise ValueError(f"tile_size must be >= 1, got {tile_size}")
    unknown = set(bugs) - set(TILED_BUGS)
    if unknown:
        raise ValueError(f"unknown bugs {sorted(unknown)}")
    bug = frozenset(name for name, planted in bugs.items() if planted)

    def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, scale: float | None = None, causal: bool = False,
               alignment: str = "top_left", softcap: float | None = None, return_weights: bool = False,
               return_lse: bool = False) -> Any:
        dtype = compute_dtype(q)
        group = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
        length, keys = q.shape[-2], k.shape[-2]
        shape = (*q.shape[:-1], keys)
        mask = None if mask is None else mask.broadcast_to(shape)
        bias = None if bias is None else bias.broadcast_to(shape)
        s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        query = torch.arange(length, device=q.device)[:, None]
        offset = 0 if alignment == "top_left" else keys - length

        def tile_logits(start: int, stop: int) -> torch.Tensor:
            """The final logits of keys start..stop-1, -inf where excluded."""
            x = torch.matmul(q.to(dtype), k[..., start:stop, :].to(dtype).transpose(-1, -2)) * s
            if softcap is not None:
                x = float(softcap) * torch.tanh(x / float(softcap))
            if bias is not None:
                x = x + bias[..., start:stop].to(dtype)
            allowed = x != NEG_INF
            if mask is not None:
                allowed = allowed & mask[..., start:stop]
            if causal:
                allowed = allowed & (torch.arange(start, stop, device=q.device) <= query + offset)
            return x.masked_fill(~allowed, NEG_INF)

        # BUG tiled_drops_last_partial_tile: loops over S // tile full tiles
        end = keys - keys % tile_size if "tiled_drops_last_partial_tile" in bug else keys
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
            if "tiled_no_rescale" not in bug:  # BUG tiled_no_rescale: acc kept at the old max's scale
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
        return pack(out, weights, lse, return_weights, return_lse)

    name = "_".join(b for b in TILED_BUGS if b in bug) or f"tiled_kernel_{tile_size}"
    kernel.__name__ = kernel.__qualname__ = name
    return kernel
