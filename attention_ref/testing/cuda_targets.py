"""Crosscheck targets for CUDA-only packed and paged kernels, declared from their documentation and
never yet run on a GPU (``Target.verified = False``: reports mark them "not verified").

* ``flash_attn.flash_attn_varlen_func`` (FlashAttention 2, ``interface="varlen"``);
* ``torch.nn.attention.varlen.varlen_attn`` (torch's packed flash kernel, ``interface="varlen"``);
* ``flash_attn.flash_attn_with_kvcache`` with ``block_table`` (``interface="paged"``, SPEC.md rule 21),
  built only when ``check`` has that interface.

Each adapter takes the checker's calling convention (``varlen_kernels``: ``fn(q, k, v, cu_seqlens_q,
cu_seqlens_k, max_seqlen_q=, max_seqlen_k=, scale=, causal=, alignment=, softcap=, window=,
return_lse=)``; the paged one ``fn(q, k_cache, v_cache, block_table, cache_seqlens, *,
cu_seqlens_q=None, max_seqlen_q=, scale=, causal=, softcap=, window=, return_lse=)``) and only maps
arguments to the kernel's documented ones: ``window`` to ``window_size`` (``None`` -> ``-1``, SPEC.md
rule 7's table), ``scale`` to ``softmax_scale``, ``softcap=None`` to ``0.0``, FlashAttention's lse layouts
to ``(Hq, total_q)``. FlashAttention aligns causal and windows bottom-right only: a top-left call is
passed on where both alignments are the same (every segment with queries has ``L_b == S_b``, or no
causal and no window) and refused (ValueError) otherwise.

The builder ``cuda_kernel_targets(device)`` returns ``[]`` unless ``device == "cuda"``, torch sees
CUDA and the kernel's package is importable; it imports nothing on the CPU.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

from .adapters import Target, _cuda_in_torch, _installed

FLASH_VARLEN = "flash_attn.flash_attn_varlen_func"
TORCH_VARLEN = "torch.nn.attention.varlen.varlen_attn"
FLASH_PAGED = "flash_attn.flash_attn_with_kvcache[block_table]"

HALF = ("float16", "bfloat16")
NOT_VERIFIED = "declared from documentation, not verified on a GPU"


def flash_window(window: tuple[int | None, int | None] | None) -> tuple[int, int]:
    """SPEC.md's ``window`` as FlashAttention's ``window_size``: ``None`` (unbounded) is ``-1``."""
    left, right = (None, None) if window is None else window
    return (-1 if left is None else int(left), -1 if right is None else int(right))


def _lengths(cu_seqlens: Any) -> np.ndarray:
    return np.diff(np.asarray(cu_seqlens.cpu() if hasattr(cu_seqlens, "cpu") else cu_seqlens).astype(np.int64))


def refuse_top_left(alignment: str, causal: bool, window: Any, cu_seqlens_q: Any, cu_seqlens_k: Any) -> None:
    """ValueError for a top-left causal or windowed call that FlashAttention's bottom-right alignment
    cannot express: some segment with queries has ``L_b != S_b``."""
    if alignment == "bottom_right" or not (causal or window is not None):
        return
    q_lengths, k_lengths = _lengths(cu_seqlens_q), _lengths(cu_seqlens_k)
    differ = np.flatnonzero((q_lengths > 0) & (q_lengths != k_lengths))
    if differ.size:
        b = int(differ[0])
        raise ValueError(f"FlashAttention aligns causal and windows bottom-right only; alignment='top_left' differs "
                         f"from it for segment {b} (L = {q_lengths[b]}, S = {k_lengths[b]})")


def flash_varlen(q: Any, k: Any, v: Any, cu_seqlens_q: Any, cu_seqlens_k: Any, *, max_seqlen_q: int,
                 max_seqlen_k: int, scale: float | None = None, causal: bool = False, alignment: str = "bottom_right",
                 softcap: float | None = None, window: tuple[int | None, int | None] | None = None,
                 return_lse: bool = False) -> Any:
    """``flash_attn_varlen_func`` on the packed problem: q ``(total_q, Hq, E)``, k and v ``(total_k, Hkv,
    E)`` (torch, CUDA, float16 or bfloat16; GQA by fewer k/v heads), cu_seqlens int32. Out ``(total_q, Hq,
    E)``; with ``return_lse`` ``(out, lse)``, lse ``(Hq, total_q)`` float32, the second of the three values
    ``return_attn_probs=True`` gives (``(out, softmax_lse, S_dmask)``)."""
    from flash_attn import flash_attn_varlen_func

    refuse_top_left(alignment, causal, window, cu_seqlens_q, cu_seqlens_k)
    result = flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=scale, causal=causal, window_size=flash_window(window),
                                    softcap=0.0 if softcap is None else float(softcap),
                                    return_attn_probs=return_lse)
    if not return_lse:
        return result
    out, lse, _ = result
    return out, lse


def torch_varlen(q: Any, k: Any, v: Any, cu_seqlens_q: Any, cu_seqlens_k: Any, *, max_seqlen_q: int,
                 max_seqlen_k: int, scale: float | None = None, causal: bool = False, alignment: str = "bottom_right",
                 window: tuple[int | None, int | None] | None = None, return_lse: bool = False) -> Any:
    """``torch.nn.attention.varlen.varlen_attn`` on the packed problem (layouts as ``flash_varlen``):
    causal is its ``window_size`` with right ``0`` (``(-1, 0)`` alone, the kernel's ``is_causal``), GQA
    through ``enable_gqa``, lse through ``return_aux=AuxRequest(lse=True)``, returned as the kernel gives
    it (its custom op's fake: ``(Hq, total_q)``)."""
    from torch.nn.attention import varlen

    refuse_top_left(alignment, causal, window, cu_seqlens_q, cu_seqlens_k)
    left, right = flash_window(window)
    if causal:
        right = 0
    return varlen.varlen_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                              return_aux=varlen.AuxRequest(lse=True) if return_lse else None, scale=scale,
                              window_size=(left, right), enable_gqa=q.shape[1] != k.shape[1])


def flash_paged(q: Any, k_cache: Any, v_cache: Any, block_table: Any, cache_seqlens: Any, *,
                cu_seqlens_q: Any = None, max_seqlen_q: int | None = None, scale: float | None = None,
                causal: bool = False, softcap: float | None = None,
                window: tuple[int | None, int | None] | None = None, return_lse: bool = False) -> Any:
    """``flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=, block_table=, ...)`` with no new k
    and v: k_cache and v_cache ``(num_blocks, page_size, Hkv, E)``, block_table ``(B, max_blocks)`` and
    cache_seqlens ``(B,)`` passed as int32. Decode (``cu_seqlens_q=None``): q ``(B, Hq, E)`` is passed as
    ``(B, 1, Hq, E)``; chunked prefill: the packed q of equal segments of ``L`` tokens as ``(B, L, Hq, E)``
    (FlashAttention takes one query length per batch: unequal segments are a ValueError), tokens after
    ``cu_seqlens_q[-1]`` get out 0 and lse -inf from the adapter. Out in q's layout; lse, FlashAttention's
    ``(B, Hq, L)``, as ``(Hq, B * L)``."""
    import torch
    from flash_attn import flash_attn_with_kvcache

    batch = int(block_table.shape[0])
    if cu_seqlens_q is None:
        length, used, queries = 1, batch, q[:, None]
    else:
        lengths = _lengths(cu_seqlens_q)
        if lengths.size and np.any(lengths != lengths[0]):
            raise ValueError(f"flash_attn_with_kvcache takes one query length per batch; the segments have "
                             f"{lengths.tolist()} queries")
        length = int(lengths[0]) if lengths.size else 0
        used = batch * length
        queries = q[:used].reshape(batch, length, *q.shape[1:])
    result = flash_attn_with_kvcache(queries, k_cache, v_cache,
                                     cache_seqlens=torch.as_tensor(cache_seqlens, dtype=torch.int32, device=q.device),
                                     block_table=torch.as_tensor(block_table, dtype=torch.int32, device=q.device),
                                     softmax_scale=scale, causal=causal, window_size=flash_window(window),
                                     softcap=0.0 if softcap is None else float(softcap), return_softmax_lse=return_lse)
    out, lse = result if return_lse else (result, None)
    out = out.reshape(used, *out.shape[2:])
    if cu_seqlens_q is not None and used < q.shape[0]:
        out = torch.cat([out, out.new_zeros((q.shape[0] - used, *out.shape[1:]))])
    if lse is None:
        return out
    lse = lse.permute(1, 0, 2).reshape(lse.shape[1], used)  # (B, Hq, L) -> (Hq, B * L)
    if cu_seqlens_q is not None and used < q.shape[0]:
        lse = torch.cat([lse, lse.new_full((lse.shape[0], q.shape[0] - used), float("-inf"))], dim=1)
    return out, lse


def _paged_interface() -> bool:
    """Whether ``check`` has ``interface="paged"`` (SPEC.md rule 21's kernel convention)."""
    from .check import INTERFACES

    return "paged" in INTERFACES


def _torch_varlen_attn() -> bool:
    """Whether this torch has ``varlen_attn`` with ``window_size`` (the signature the adapter calls)."""
    if not _installed("torch.nn.attention.varlen"):
        return False
    from torch.nn.attention import varlen

    return "window_size" in inspect.signature(varlen.varlen_attn).parameters


EMPTY_ROW_LSE = ("rows with no key (an empty segment or cache, or causal with L_b > S_b): out 0 and, per "
                 "FlashAttention 2's softmax.h, lse +inf (-inf on its split-KV path), not SPEC.md's -inf: declared "
                 "as empty_lse='+inf' for the varlen kernel (verified, reported as convention differs); the paged "
                 "interface has no such declaration, so there the lse comparisons on such rows are expected to FAIL")
TOP_LEFT = ("causal and window_size are bottom-right only: alignment='top_left' is passed on where it equals "
            "bottom-right (every segment with queries has L_b == S_b, or no causal and no window) and refused "
            "(ValueError, an ERROR cell) otherwise")


def cuda_kernel_targets(device: str) -> list[Target]:
    """The CUDA-only packed and paged targets that are importable (none on the CPU)."""
    if device != "cuda" or not _installed("torch") or not _cuda_in_torch():
        return []
    targets = []
    if _installed("flash_attn"):
        targets.append(Target(
            FLASH_VARLEN, "torch", flash_varlen, ("scale", "causal", "gqa", "window", "softcap", "lse"),
            dtypes=HALF, device="cuda", interface="varlen", verified=False, cost=30,
            conventions=(("empty_lse", "+inf"), ("causal_alignment", "bottom_right")),
            notes=(NOT_VERIFIED,
                   "adapter: flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, "
                   "dropout_p=0.0, softmax_scale=scale, causal=, window_size=(l, r) with -1 for None, softcap=0.0 for "
                   "None, return_attn_probs=return_lse); lse the second of (out, softmax_lse, S_dmask), (Hq, total_q)",
                   TOP_LEFT, EMPTY_ROW_LSE,
                   "float16 and bfloat16 only; Ev == E (one headdim for q, k, v); no mask, bias or dropout checked")))
        if _paged_interface():
            targets.append(Target(
                FLASH_PAGED, "torch", flash_paged, ("scale", "causal", "gqa", "window", "softcap", "lse"),
                dtypes=HALF, device="cuda", interface="paged", verified=False, cost=30,
                notes=(NOT_VERIFIED,
                       "adapter: flash_attn_with_kvcache(q as (B, L, Hq, E), k_cache, v_cache, cache_seqlens=int32, "
                       "block_table=int32, softmax_scale=, causal=, window_size=, softcap=, return_softmax_lse=); "
                       "no new k, v; lse (B, Hq, L) returned as (Hq, B * L)",
                       "restriction: FlashAttention 2's paged KV needs page_size a multiple of 256 (documented): "
                       "smaller drawn pages are refused by the kernel (ERROR cells)",
                       "chunked prefill: one query length per batch (unequal segments: ValueError, ERROR cells)",
                       EMPTY_ROW_LSE)))
    if _torch_varlen_attn():
        targets.append(Target(
            TORCH_VARLEN, "torch", torch_varlen, ("scale", "causal", "gqa", "window", "lse"),
            dtypes=HALF, device="cuda", interface="varlen", verified=False, cost=30,
            conventions=(("causal_alignment", "bottom_right"),),
            notes=(NOT_VERIFIED,
                   "adapter: varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, return_aux=AuxRequest(lse=True), "
                   "scale=, window_size=(l, r) with -1 for None and r = 0 for causal, enable_gqa=Hq != Hkv)",
                   "causal through window_size (-1, 0) (torch's is_causal), bottom-right as its flash kernel",
                   TOP_LEFT,
                   "lse passed on as returned: the custom op's fake gives (Hq, total_q), varlen_attn's docstring says "
                   "(T_q, H_q); a GPU run decides (a wrong shape FAILs)",
                   EMPTY_ROW_LSE, "float16 and bfloat16 (its flash backend); no softcap; Ev == E")))
    return targets
