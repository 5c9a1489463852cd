"""A NumPy kernel with FlashAttention's packed variable-length interface, written as people write it
(a loop over the segments), and planted bugs of that interface (issue 13's catalogue).

``varlen_kernel(**bugs)`` returns ``attention(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q,
max_seqlen_k, scale=None, causal=False, alignment="top_left", softcap=None, window=None,
return_lse=False)``: q ``(total_q, Hq, E)``, k and v ``(total_k, Hkv, E|Ev)``, out ``(total_q, Hq,
Ev)``, lse ``(Hq, total_q)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: Every planted bug: its switch, what it does, and the property that must catch it.
VARLEN_BUGS: dict[str, tuple[str, str]] = {
    "causal_top_left_always": ("per-segment causal aligned top-left even when bottom_right is asked",
                               "varlen_equals_each_segments_attention"),
    "global_positions": ("causal uses positions in the packed sequence, not within the segment",
                         "varlen_equals_each_segments_attention"),
    "across_segments": ("each query attends every key of the packed batch: no segment boundary",
                        "varlen_equals_each_segments_attention"),
    "cu_seqlens_off_by_one": ("segment b's keys start at cu_seqlens_k[b] + 1 when b > 0",
                              "varlen_equals_each_segments_attention"),
    "empty_segment_shifts_next": ("a zero-length query segment makes the next segment read the previous keys",
                                  "varlen_equals_each_segments_attention"),
    "writes_beyond_last_segment": ("tokens after cu_seqlens_q[-1] get the last segment's output, not 0",
                                   "varlen_equals_each_segments_attention"),
    "lse_token_major": ("lse returned as (total_q, Hq) values read as (Hq, total_q)",
                        "varlen_equals_each_segments_attention"),
}


@dataclass(frozen=True)
class VarlenBug:
    name: str
    description: str
    catches: str


VARLEN_BUG_LIST = tuple(VarlenBug(name, *what) for name, what in VARLEN_BUGS.items())

#: The features of the varlen kernel.
VARLEN_FEATURES = ("scale", "causal", "bottom_right", "softcap", "window", "gqa", "value_dim", "lse")


def varlen_kernel(**bugs: bool) -> Any:
    """The correct varlen kernel, or with the named bugs planted."""
    unknown = set(bugs) - set(VARLEN_BUGS)
    assert not unknown, unknown
    bug = {name: bugs.get(name, False) for name in VARLEN_BUGS}

    def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, cu_seqlens_q: np.ndarray, cu_seqlens_k: np.ndarray, *,
                  max_seqlen_q: int, max_seqlen_k: int, scale: float | None = None, causal: bool = False,
                  alignment: str = "top_left", softcap: float | None = None,
                  window: tuple[int | None, int | None] | None = None, return_lse: bool = False) -> Any:
        cu_q, cu_k = np.asarray(cu_seqlens_q).astype(int), np.asarray(cu_seqlens_k).astype(int)
        total_q, hq, e = q.shape
        hkv, ev = k.shape[1], v.shape[2]
        scale = 1 / np.sqrt(e) if scale is None else scale
        out = np.zeros((total_q, hq, ev))
        lse = np.full((total_q, hq), -np.inf) if bug["lse_token_major"] else np.full((hq, total_q), -np.inf)
        previous_keys = (0, 0)
        for b in range(cu_q.size - 1):
            q0, q1 = cu_q[b], cu_q[b + 1]
            k0, k1 = cu_k[b], cu_k[b + 1]
            if bug["cu_seqlens_off_by_one"] and b > 0:
                k0 = min(k0 + 1, k1)
            if bug["empty_segment_shifts_next"] and b > 0 and cu_q[b - 1] == cu_q[b]:
                k0, k1 = previous_keys
            if bug["across_segments"]:
                k0, k1 = 0, cu_k[-1]
            previous_keys = (cu_k[b], cu_k[b + 1])
            if q1 == q0:
                continue
            qs = q[q0:q1].astype(np.float64).swapaxes(0, 1)  # (Hq, L, E)
            ks = np.repeat(k[k0:k1].astype(np.float64).swapaxes(0, 1), hq // hkv, axis=0)
            vs = np.repeat(v[k0:k1].astype(np.float64).swapaxes(0, 1), hq // hkv, axis=0)
            logits = qs @ ks.swapaxes(-1, -2) * scale
            if softcap is not None:
                logits = softcap * np.tanh(logits / softcap)
            length, keys = q1 - q0, k1 - k0
            rows = np.arange(length)[:, None] + (q0 if bug["global_positions"] else 0)
            cols = np.arange(keys)[None, :] + (k0 if bug["global_positions"] else 0)
            aligned = alignment == "bottom_right" and not bug["causal_top_left_always"]
            offset = keys - length if aligned else 0
            allowed = np.ones((length, keys), dtype=bool)
            if causal:
                allowed &= cols <= rows + offset
            if window is not None:
                left, right = window
                if left is not None:
                    allowed &= cols >= rows + offset - left
                if right is not None:
                    allowed &= cols <= rows + offset + right
            logits = np.where(allowed, logits, -np.inf)
            top = logits.max(axis=-1, keepdims=True, initial=-np.inf)
            weights = np.exp(logits - np.where(np.isfinite(top), top, 0))
            total = weights.sum(axis=-1, keepdims=True)
            out[q0:q1] = (weights / np.where(total == 0, 1, total) @ vs).swapaxes(0, 1)
            with np.errstate(divide="ignore"):
                segment_lse = (np.where(np.isfinite(top), top, 0) + np.log(total))[..., 0]
            segment_lse = np.where(total[..., 0] == 0, -np.inf, segment_lse)
            if bug["lse_token_major"]:
                lse[q0:q1] = segment_lse.T
            else:
                lse[:, q0:q1] = segment_lse
        if bug["writes_beyond_last_segment"] and cu_q[-1] < total_q and cu_q[-1] > 0:
            out[cu_q[-1]:] = out[cu_q[-1] - 1]
        out = out.astype(q.dtype)
        if bug["lse_token_major"]:
            lse = lse.reshape(hq, total_q)
        return (out, lse) if return_lse else out

    return attention


def convention_kernel(*, empty_lse: str = "-inf", lse_layout: str = "packed", alignment: str | None = None) -> Any:
    """The correct varlen kernel with other conventions: lse ``+inf`` on rows with no key
    (``empty_lse="+inf"``, FlashAttention 2), lse padded ``(B, Hq, max_seqlen_q)`` (``lse_layout=
    "padded"``, zeros past each segment), and with ``alignment`` set no alignment keyword, always that
    alignment (FlashAttention >= 2.1: "bottom_right")."""
    correct = varlen_kernel()

    def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, cu_seqlens_q: np.ndarray, cu_seqlens_k: np.ndarray,
                  **keywords: Any) -> Any:
        if alignment is not None:
            keywords["alignment"] = alignment
        result = correct(q, k, v, cu_seqlens_q, cu_seqlens_k, **keywords)
        if not keywords.get("return_lse"):
            return result
        out, lse = result
        if empty_lse == "+inf":
            lse = np.where(lse == -np.inf, np.inf, lse)
        if lse_layout == "padded":
            cu = np.asarray(cu_seqlens_q).astype(int)
            padded = np.zeros((cu.size - 1, lse.shape[0], keywords["max_seqlen_q"]))
            for b in range(cu.size - 1):
                padded[b, :, :cu[b + 1] - cu[b]] = lse[:, cu[b]:cu[b + 1]]
            lse = padded
        return out, lse

    return attention


#: Kernels that declare their conventions truthfully: name -> (the kernel's conventions, the check keywords).
HONEST_CONVENTIONS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "empty_lse_inf": ({"empty_lse": "+inf"}, {"empty_lse": "+inf"}),
    "lse_padded": ({"lse_layout": "padded"}, {"lse_layout": "padded"}),
    "always_bottom_right": ({"alignment": "bottom_right"}, {"causal_alignment": "bottom_right"}),
    "flash_attention_2": ({"empty_lse": "+inf", "lse_layout": "padded", "alignment": "bottom_right"},
                          {"empty_lse": "+inf", "lse_layout": "padded", "causal_alignment": "bottom_right"}),
}

#: Kernels whose declaration is false: name -> (the kernel's conventions, the check keywords, the property
#: that must FAIL).
FALSE_DECLARATIONS: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    "declares_inf_returns_minus_inf": ({}, {"empty_lse": "+inf"}, "varlen_equals_each_segments_attention"),
    "declares_padded_returns_packed": ({}, {"lse_layout": "padded"}, "varlen_equals_each_segments_attention"),
    "declares_bottom_right_is_top_left": ({"alignment": "top_left"}, {"causal_alignment": "bottom_right"},
                                          "varlen_equals_each_segments_attention"),
}
