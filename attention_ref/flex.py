"""FlexAttention's programs for every backend (SPEC.md rule 22): the common ``mask_mod`` and
``score_mod`` patterns, written once for NumPy, JAX and torch, and ``materialize``, the exact
elementwise mask of a torch ``BlockMask``.

Each mod here is framework-neutral. It reads the framework (and device) from the index arrays it
is called with and converts its own tables, NumPy arrays given at construction, to that framework on
first use (score tables to the score's dtype). It works on broadcast index arrays, as the backends
call it (``attention(..., mask_mod=document_mask(cu_seqlens))``), and on FlexAttention's scalar index
tensors, as ``flex_attention`` calls it. Index conventions are rule 22's: ``b`` the flattened batch
element, ``h`` the query head, ``q_idx`` and ``kv_idx`` positions in the call's sequences.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from .frameworks import framework_of
from .varlen import cu_seqlens_to_segment_ids

__all__ = [
    "alibi",
    "alibi_slopes",
    "and_masks",
    "bias_mod",
    "causal_mask",
    "document_mask",
    "mask_from_array",
    "materialize",
    "or_masks",
    "prefix_lm_mask",
    "relative_bias",
    "sliding_window_mask",
    "softcap_mod",
]


def _namespace(x: Any) -> Any:
    """The array module of x's framework: numpy, jax.numpy or torch."""
    framework = framework_of(x)
    if framework == "torch":
        import torch

        return torch
    if framework == "jax":
        import jax.numpy as jnp

        return jnp
    return np


class _Tables:
    """A mod's NumPy tables, given to it in the framework, device and (where asked) dtype of a ``like``
    array. Nothing is cached at call time (FlexAttention traces its mods and refuses side effects):
    torch tensors are made once, at construction, when torch is already imported."""

    def __init__(self, **tables: np.ndarray) -> None:
        self.numpy = {name: np.asarray(table) for name, table in tables.items()}
        torch = sys.modules.get("torch")
        self.torch = {} if torch is None else {name: torch.as_tensor(np.array(t)) for name, t in self.numpy.items()}

    def get(self, name: str, like: Any, dtype: Any = None) -> Any:
        framework = framework_of(like)
        table = self.numpy[name]
        if framework == "torch":
            import torch

            tensor = self.torch[name] if name in self.torch else torch.as_tensor(np.array(table))
            return tensor.to(device=like.device, dtype=tensor.dtype if dtype is None else dtype)
        if framework == "jax":
            import jax.numpy as jnp

            return jnp.asarray(table, dtype=dtype)
        return table if dtype is None else table.astype(dtype)


def causal_mask(offset: int = 0) -> Callable[..., Any]:
    """mask_mod: query i attends key j iff ``j <= i + offset`` (rule 7: 0 top-left, ``S - L``
    bottom-right)."""

    def mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return q_idx + offset >= kv_idx

    return mask_mod


def sliding_window_mask(left: int | None, right: int | None = 0, offset: int = 0) -> Callable[..., Any]:
    """mask_mod: rule 7's ``window=(left, right)`` at ``offset``: ``i + offset - left <= j <= i + offset +
    right`` (None: unbounded; ``right=0`` is a causal window of ``left + 1`` keys)."""

    def mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        ok = (kv_idx >= 0) & (q_idx >= 0)
        if left is not None:
            ok = ok & (kv_idx >= q_idx + offset - left)
        if right is not None:
            ok = ok & (kv_idx <= q_idx + offset + right)
        return ok

    return mask_mod


def prefix_lm_mask(prefix_length: int) -> Callable[..., Any]:
    """mask_mod of a prefix LM: every query attends the first ``prefix_length`` keys, and the others
    causally (top-left)."""

    def mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return (kv_idx < prefix_length) | (kv_idx <= q_idx)

    return mask_mod


def document_mask(cu_seqlens_q: Any, cu_seqlens_k: Any = None) -> Callable[..., Any]:
    """mask_mod of packed documents: query i attends key j iff both are in the same document,
    document d holding queries ``cu_seqlens_q[d]:cu_seqlens_q[d + 1]`` and keys
    ``cu_seqlens_k[d]:cu_seqlens_k[d + 1]`` (default: the query offsets; FlashAttention's layout, rule
    20). Tokens in no document attend nothing and are attended by nothing. Combine with
    ``causal_mask()`` for causal documents of equal query and key offsets."""
    cu_q = np.asarray(cu_seqlens_q, dtype=np.int64)
    cu_k = cu_q if cu_seqlens_k is None else np.asarray(cu_seqlens_k, dtype=np.int64)
    q_len, k_len = int(cu_q[-1]), int(cu_k[-1])
    # Each table ends with a -1: the document of every token at or after the last offset.
    tables = _Tables(q=np.append(cu_seqlens_to_segment_ids(cu_q, q_len), -1),
                     k=np.append(cu_seqlens_to_segment_ids(cu_k, k_len), -2))

    def mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        xp = _namespace(q_idx)
        doc_q = tables.get("q", q_idx)[xp.where(q_idx < q_len, q_idx, q_len)]
        doc_k = tables.get("k", q_idx)[xp.where(kv_idx < k_len, kv_idx, k_len)]
        return (doc_q == doc_k) & (doc_q >= 0)

    return mask_mod


def _broadcast_indices(shape: tuple[int, ...], *indices: Any) -> tuple[Any, ...]:
    """``(b, h, q_idx, kv_idx)`` for a ``(B, H, L, S)`` table: index 0 along its size-1 dims (broadcast).
    The table must cover the call's sizes elsewhere (JAX clamps an index beyond it, NumPy and torch raise)."""
    return tuple(index * 0 if size == 1 else index for size, index in zip(shape, indices, strict=True))


def mask_from_array(mask: Any) -> Callable[..., Any]:
    """mask_mod reading an explicit boolean mask ``(B, H, L, S)`` (sizes 1 broadcast; B the flattened
    batch), as ``mask[b, h, q_idx, kv_idx]``: a data-dependent mod."""
    table = np.asarray(mask, dtype=bool)
    if table.ndim != 4:
        raise ValueError(f"mask_from_array needs a (B, H, L, S) mask, got shape {table.shape}")
    tables = _Tables(mask=table)

    def mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return tables.get("mask", q_idx)[_broadcast_indices(table.shape, b, h, q_idx, kv_idx)]

    return mask_mod


def and_masks(*mods: Callable[..., Any]) -> Callable[..., Any]:
    """mask_mod: every one of ``mods`` allows the key."""

    def mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        result = mods[0](b, h, q_idx, kv_idx)
        for mod in mods[1:]:
            result = result & mod(b, h, q_idx, kv_idx)
        return result

    return mask_mod


def or_masks(*mods: Callable[..., Any]) -> Callable[..., Any]:
    """mask_mod: any one of ``mods`` allows the key."""

    def mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        result = mods[0](b, h, q_idx, kv_idx)
        for mod in mods[1:]:
            result = result | mod(b, h, q_idx, kv_idx)
        return result

    return mask_mod


def bias_mod(bias: Any) -> Callable[..., Any]:
    """score_mod adding an explicit bias ``(B, H, L, S)`` (sizes 1 broadcast; B the flattened batch),
    ``score + bias[b, h, q_idx, kv_idx]`` (in the score's dtype): with no softcap, the same as
    ``bias=`` (rule 22)."""
    table = np.asarray(bias)
    if table.ndim != 4:
        raise ValueError(f"bias_mod needs a (B, H, L, S) bias, got shape {table.shape}")
    tables = _Tables(bias=table)

    def score_mod(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return score + tables.get("bias", score, score.dtype)[_broadcast_indices(table.shape, b, h, q_idx, kv_idx)]

    return score_mod


def softcap_mod(cap: float) -> Callable[..., Any]:
    """score_mod ``cap * tanh(score / cap)``: with no bias, the same as ``softcap=cap`` (rule 4)."""

    def score_mod(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return cap * _namespace(score).tanh(score / cap)

    return score_mod


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi's head slopes (Press et al.), float64 ``(num_heads,)``: ``2 ** (-8 (h + 1) / n)`` for the
    power of two ``n >= num_heads``, the odd heads of ``2n`` filling in beyond a power of two."""
    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    power = 1 << (max(num_heads, 1).bit_length() - 1)
    slopes = geometric(power)
    if power < num_heads:
        slopes += geometric(2 * power)[0::2][: num_heads - power]
    return np.asarray(slopes[:num_heads], dtype=np.float64)


def alibi(slopes: Any, offset: int = 0) -> Callable[..., Any]:
    """score_mod of ALiBi, FlashAttention's form: ``score - slopes[h] * |q_idx + offset - kv_idx|``
    (slopes ``(Hq,)``, one per query head; ``offset`` as in rule 7, ``S - L`` to align bottom-right)."""
    tables = _Tables(slopes=np.asarray(slopes, dtype=np.float64))

    def score_mod(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        distance = _namespace(score).abs(q_idx + offset - kv_idx)
        return score - tables.get("slopes", score, score.dtype)[h] * distance

    return score_mod


def relative_bias(table: Any, max_distance: int) -> Callable[..., Any]:
    """score_mod of a learned relative-position bias (T5-style, unbucketed): ``score + table[h,
    clip(kv_idx - q_idx, -max_distance, max_distance) + max_distance]``, table ``(Hq, 2 max_distance
    + 1)``."""
    array = np.asarray(table)
    if array.ndim != 2 or array.shape[1] != 2 * max_distance + 1:
        raise ValueError(f"relative_bias needs a table (Hq, 2 * max_distance + 1) = (Hq, {2 * max_distance + 1}), "
                         f"got shape {array.shape}")
    tables = _Tables(table=array)

    def score_mod(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        xp = _namespace(score)
        relative = kv_idx - q_idx
        clip = xp.clamp if xp.__name__ == "torch" else xp.clip
        return score + tables.get("table", score, score.dtype)[h, clip(relative, -max_distance, max_distance)
                                                               + max_distance]

    return score_mod


def materialize(block_mask: Any) -> np.ndarray:
    """The exact elementwise mask of a torch FlexAttention ``BlockMask``: boolean ``(B, H, Q_LEN,
    KV_LEN)`` (B and H as the block mask has them, 1 where it broadcasts), True where flex attends.

    A BlockMask is block-granular: in its *partial* blocks (``kv_num_blocks``/``kv_indices``) a key is
    attended iff its ``mask_mod`` allows it; in its *full* blocks (``full_kv_num_blocks``/
    ``full_kv_indices``) every key is attended and ``mask_mod`` is never run; other blocks are skipped.
    The result is cut to the block mask's ``seq_lengths``, and ``mask_mod`` is evaluated only there (on
    int32 index tensors broadcast as rule 22's)."""
    import torch

    def blocks(num: Any, indices: Any) -> np.ndarray:  # (B, H, nq, nkv) bool: the listed blocks
        num_np, idx_np = num.cpu().numpy(), indices.cpu().numpy()
        listed = np.zeros((*idx_np.shape[:3], idx_np.shape[-1]), dtype=bool)
        used = np.arange(idx_np.shape[-1]) < num_np[..., None]
        b, h, qb, slot = np.nonzero(used)
        listed[b, h, qb, idx_np[b, h, qb, slot]] = True
        return listed

    q_block, kv_block = block_mask.BLOCK_SIZE
    q_len, kv_len = block_mask.seq_lengths
    partial = blocks(block_mask.kv_num_blocks, block_mask.kv_indices)
    full = np.zeros_like(partial)
    if block_mask.full_kv_num_blocks is not None:
        full = blocks(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)

    def expand(listed: np.ndarray) -> np.ndarray:
        elementwise = np.repeat(np.repeat(listed, q_block, axis=2), kv_block, axis=3)
        return elementwise[:, :, :q_len, :kv_len]

    batch, heads = partial.shape[:2]
    if block_mask.mask_mod is None:
        modded = np.ones((1, 1, q_len, kv_len), dtype=bool)
    else:
        device = block_mask.kv_num_blocks.device

        def arange(n: int) -> Any:
            return torch.arange(n, dtype=torch.int32, device=device)

        result = block_mask.mask_mod(arange(batch).reshape(batch, 1, 1, 1), arange(heads).reshape(1, heads, 1, 1),
                                     arange(q_len).reshape(1, 1, q_len, 1), arange(kv_len).reshape(1, 1, 1, kv_len))
        modded = np.broadcast_to(result.cpu().numpy().astype(bool), (batch, heads, q_len, kv_len))
    return (expand(partial) & modded) | expand(full)
