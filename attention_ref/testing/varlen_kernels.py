"""Kernels with FlashAttention's packed variable-length interface (``check(..., interface="varlen")``,
SPEC.md rule 20) seen through the checker's two calls.

A varlen kernel is called as ``fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=...,
max_seqlen_k=..., **keywords)``: q ``(total_q, Hq, E)``, k ``(total_k, Hkv, E)``, v ``(total_k,
Hkv, Ev)``, ``cu_seqlens`` int32 arrays of its framework on q's device, the longest segment's
lengths as ints, and the spec's keywords of its declared features (``scale``, ``causal`` with
``alignment`` when it declares ``bottom_right``, ``softcap``, ``window``, ``return_lse``). It returns
out ``(total_q, Hq, Ev)``, or ``(out, lse)`` with ``return_lse``, lse ``(Hq, total_q)``.

* ``dense_through_varlen(fn, backend)`` is a kernel of the dense calling convention: a dense call
  ``(*B, Hq, L, E)`` is the packed batch of its ``prod(B)`` rows, one segment each, so that every
  property of dense attention checks the varlen kernel too (its segmentation: equal lengths);
* ``call_varlen`` runs the kernel on a packed problem as ``Backend.varlen_attention`` takes it, so
  that the varlen properties (drawn segmentations, empty segments, tokens in no segment) check it.

A varlen kernel has no mask, bias, dropout or weights, and its gradients are not checked yet (the
varlen gradient property needs a ``varlen_attention_vjp`` of the kernel): declaring any of them is a
ValueError.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

#: Features the varlen interface cannot have.
NOT_VARLEN = ("mask", "bias", "dropout", "weights", "grad", "dbias")


def check_varlen_supports(supports: tuple[str, ...] | list[str]) -> None:
    """ValueError for a declared feature that the varlen interface has no argument or result for."""
    refused = [feature for feature in supports if feature in NOT_VARLEN]
    if refused:
        raise ValueError(f"interface='varlen' has no {', '.join(refused)}: a varlen kernel takes q, k, v, "
                         "cu_seqlens_q, cu_seqlens_k and the keywords scale, causal, alignment, softcap, window, "
                         "return_lse")


def _int32_like(backend: Any, values: np.ndarray, like: Any) -> Any:
    return backend.asarray_like(np.ascontiguousarray(values, dtype=np.int32), like)


def call_varlen(fn: Callable[..., Any], backend: Any, q: Any, k: Any, v: Any, cu_seqlens_q: np.ndarray,
                cu_seqlens_k: np.ndarray, keywords: dict[str, Any]) -> Any:
    """The kernel's result on a packed problem: framework arrays q, k, v, NumPy ``cu_seqlens``
    (passed as int32 arrays on q's device, with ``max_seqlen_q``/``max_seqlen_k``)."""
    cu_q, cu_k = np.asarray(cu_seqlens_q), np.asarray(cu_seqlens_k)
    return fn(q, k, v, _int32_like(backend, cu_q, q), _int32_like(backend, cu_k, q),
              max_seqlen_q=int(np.diff(cu_q).max(initial=0)), max_seqlen_k=int(np.diff(cu_k).max(initial=0)),
              **keywords)


def dense_through_varlen(fn: Callable[..., Any], backend: Any) -> Callable[..., Any]:
    """A kernel of the dense convention (q ``(*B, Hq, L, E)`` or rank 2; out, or ``(out, None, lse)``
    with ``return_lse``) that runs the varlen kernel ``fn`` on the packed batch: each of the
    ``prod(B)`` rows is a segment of L queries and S keys."""

    def dense(q: Any, k: Any, v: Any, **keywords: Any) -> Any:
        rank2 = len(q.shape) == 2
        if rank2:
            q, k, v = q[None], k[None], v[None]
        lead = tuple(q.shape[:-3])
        rows = math.prod(lead)
        (hq, q_len, e), (hkv, kv_len, ev) = q.shape[-3:], v.shape[-3:]

        def packed(x: Any, heads: int, length: int, width: int) -> Any:  # (*B, H, L, E) -> (N * L, H, E)
            return x.reshape(rows, heads, length, width).swapaxes(1, 2).reshape(rows * length, heads, width)

        result = call_varlen(fn, backend, packed(q, hq, q_len, e), packed(k, hkv, kv_len, e),
                             packed(v, hkv, kv_len, ev), np.arange(rows + 1) * q_len, np.arange(rows + 1) * kv_len,
                             keywords)
        out, lse = (result[0], result[1]) if isinstance(result, tuple | list) else (result, None)
        out = out.reshape(rows, q_len, hq, ev).swapaxes(1, 2).reshape(*lead, hq, q_len, ev)
        if lse is not None:  # (Hq, N * L) -> (*B, Hq, L)
            lse = lse.reshape(hq, rows, q_len).swapaxes(0, 1).reshape(*lead, hq, q_len)
        if rank2:
            out, lse = out[0], None if lse is None else lse[0]
        return (out, None, lse) if "return_lse" in keywords else out

    dense.__name__ = getattr(fn, "__name__", "varlen_kernel")
    return dense
