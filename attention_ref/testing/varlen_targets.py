"""Built-in crosscheck targets with FlashAttention's packed variable-length interface
(``check(..., interface="varlen")``, SPEC.md rule 20) that run on the CPU.

Each adapter takes the varlen call, q ``(total_q, Hq, E)``, k ``(total_k, Hkv, E)``, v ``(total_k,
Hkv, Ev)``, ``cu_seqlens_q``/``cu_seqlens_k`` ``(B + 1,)`` int32 arrays of its framework,
``max_seqlen_q=``/``max_seqlen_k=`` and the spec's keywords of its declared features, and maps it to
the framework's own ragged call; it returns out ``(total_q, Hq, Ev)`` (and lse ``(Hq, total_q)`` with
``return_lse``). Mapping means gathering the packed tokens into the framework's layout and scattering
its results back: tokens at or after ``cu_seqlens_q[-1]`` belong to no segment, the framework is never
asked about them, and the adapter writes out 0 (lse -inf) there, since no result of the framework's
exists for them. Nothing else of the answer is computed here.

* ``jax.nn.dot_product_attention seq_lengths[xla]`` (builder ``jax_varlen_targets``): the segments as
  a right-padded batch ``(B, max_seqlen, H, E)`` (padding: zeros) with ``query_seq_lengths`` and
  ``key_value_seq_lengths``; lse through ``return_residual``.
* ``torch nested jagged sdpa`` (builder ``torch_varlen_targets``): the segments as jagged nested tensors
  (``torch.nested.nested_tensor_from_jagged`` with ``cu_seqlens`` as offsets), ``(B, j, H, E)``
  transposed heads-first for ``F.scaled_dot_product_attention``, out read back from ``.values()``.

Neither target's name contains another target's name, so that ``crosscheck(only=...)`` selections of
the dense targets (``"jax.nn"``, ``"torch.sdpa[MATH]"``) keep meaning what they meant.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .adapters import Target, _installed, _jax_platform, jax_local_window_size

JAX_VARLEN = "jax.nn.dot_product_attention seq_lengths[xla]"
TORCH_NESTED = "torch nested jagged sdpa"


def _segments(cu_seqlens: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, lengths)`` of the segments of a concrete ``cu_seqlens`` (any framework's array)."""
    cu = np.asarray(cu_seqlens).astype(np.int64)
    return cu[:-1], np.diff(cu)


def _padded_index(starts: np.ndarray, lengths: np.ndarray, width: int, pad: int) -> np.ndarray:
    """``(B, width)`` packed-token index of each padded position; ``pad`` where the segment has ended."""
    positions = np.arange(width)[None, :]
    return np.where(positions < lengths[:, None], starts[:, None] + positions, pad)


def _packed_index(starts: np.ndarray, lengths: np.ndarray, width: int, total: int) -> np.ndarray:
    """``(total,)`` flat padded position ``b * width + t`` of each packed token; ``B * width`` (one row past
    the padded results) for tokens in no segment."""
    index = np.full(total, len(lengths) * width, dtype=np.int64)
    for b, (start, length) in enumerate(zip(starts, lengths, strict=True)):
        index[start:start + length] = b * width + np.arange(length)
    return index


def jax_seq_lengths(q: Any, k: Any, v: Any, cu_seqlens_q: Any, cu_seqlens_k: Any, *, max_seqlen_q: int,
                    max_seqlen_k: int, scale: float | None = None, causal: bool = False, window: Any = None,
                    return_lse: bool = False) -> Any:
    """``jax.nn.dot_product_attention(implementation="xla")`` on the segments as a right-padded batch
    ``(B, max_seqlen, H, E)`` (padding: zeros) with ``query_seq_lengths``/``key_value_seq_lengths``:
    causal (``is_causal``) and the window (``local_window_size``) count from each row's first token, so
    per segment top-left. Jitted (one program per shape; the gather indices and lengths are traced)
    except for float16 and bfloat16, as the dense jax.nn target."""
    import jax
    import jax.numpy as jnp

    q_starts, q_lengths = _segments(cu_seqlens_q)
    k_starts, k_lengths = _segments(cu_seqlens_k)
    with jax.enable_x64(q.dtype == jnp.float64):
        arrays = (jnp.asarray(_padded_index(q_starts, q_lengths, max_seqlen_q, q.shape[0])),
                  jnp.asarray(_padded_index(k_starts, k_lengths, max_seqlen_k, k.shape[0])),
                  jnp.asarray(_packed_index(q_starts, q_lengths, max_seqlen_q, q.shape[0])),
                  jnp.asarray(q_lengths, jnp.int32), jnp.asarray(k_lengths, jnp.int32))
        static = (causal, None if window is None else tuple(window), return_lse, scale is not None)
        if q.dtype in (jnp.float16, jnp.bfloat16):
            return _jax_padded_call(q, k, v, *arrays, scale, *static)
        if static not in _JAX_JITTED:
            _JAX_JITTED[static] = jax.jit(lambda *traced, static=static: _jax_padded_call(*traced, *static))
        return _JAX_JITTED[static](q, k, v, *arrays, scale)


_JAX_JITTED: dict[Any, Any] = {}


def _jax_padded_call(q: Any, k: Any, v: Any, q_index: Any, k_index: Any, out_index: Any, q_lengths: Any,
                     k_lengths: Any, scale: Any, causal: bool, window: Any, return_lse: bool, scaled: bool) -> Any:
    """Gather to the padded batch, jax.nn's call, scatter back to the packed layout (out 0, lse -inf for
    tokens in no segment)."""
    import jax
    import jax.numpy as jnp

    def padded(x: Any, index: Any) -> Any:  # (total, H, E) -> (B, width, H, E), zeros past each segment
        return jnp.concatenate([x, jnp.zeros((1, *x.shape[1:]), x.dtype)])[index]

    qp, kp, vp = padded(q, q_index), padded(k, k_index), padded(v, k_index)
    result = jax.nn.dot_product_attention(
        qp, kp, vp, scale=scale if scaled else None, is_causal=causal,
        local_window_size=jax_local_window_size(window, qp, kp), query_seq_lengths=q_lengths,
        key_value_seq_lengths=k_lengths, implementation="xla", return_residual=return_lse)
    out, lse = result if return_lse else (result, None)
    rows = out.reshape(-1, *out.shape[2:])
    out = jnp.concatenate([rows, jnp.zeros((1, *rows.shape[1:]), rows.dtype)])[out_index]
    if lse is None:
        return out
    lse_rows = lse.reshape(-1, lse.shape[-1])  # (B * T, Hq)
    lse_rows = jnp.concatenate([lse_rows, jnp.full((1, lse_rows.shape[-1]), -jnp.inf, lse_rows.dtype)])
    return out, lse_rows[out_index].T


def jax_varlen_targets(device: str) -> list[Target]:
    """jax.nn's dot_product_attention with sequence lengths (jax is imported only to ask for a GPU)."""
    platform = _jax_platform(device) if _installed("jax") else None
    if platform is None:
        return []
    return [Target(
        JAX_VARLEN, "jax", jax_seq_lengths, ("scale", "causal", "gqa", "window", "lse"),
        fully_masked="mean_v", device=None if device == "cpu" else platform, interface="varlen", few_shapes=True,
        cost=60,
        notes=("adapter: segments as a right-padded batch (B, max_seqlen, H, E), padding zeros, with "
               "query_seq_lengths / key_value_seq_lengths; results scattered back to the packed layout; tokens in "
               "no segment: out 0 and lse -inf written by the adapter (jax is not asked about them)",
               "causal and local_window_size count from each segment's first token: top-left only (no "
               "bottom_right: jax.nn has no alignment, and its padding is on the right)",
               "fully excluded rows: jax.nn's finite mask fill, so out is the mean of v over the padded row's "
               "masked keys (padding included) and lse a finite -2.4e38, not SPEC.md's -inf; mean_v is verified on "
               "the dense path (equal segments, no padding); the varlen path compares them as they are",
               "lse through return_residual=True; Ev == E (jax.nn requires v of k's shape); no softcap; jitted "
               "(float32, float64; one program per padded shape), so the dense properties draw sizes from a small "
               "menu")),
    ]


def torch_nested_sdpa(q: Any, k: Any, v: Any, cu_seqlens_q: Any, cu_seqlens_k: Any, *, max_seqlen_q: int,
                      max_seqlen_k: int, scale: float | None = None) -> Any:
    """``F.scaled_dot_product_attention`` on jagged nested tensors: each of q, k, v cut to its segments
    with ``nested_tensor_from_jagged(values, offsets=cu_seqlens)`` ``(B, j, H, E)``, transposed to
    ``(B, H, j, E)`` as SDPA takes them; out ``(B, j, Hq, Ev)``'s values are the packed tokens of the
    segments, followed by zeros for the tokens in no segment. No causal (SDPA refuses ``is_causal`` on
    nested tensors), no mask, no GQA (the nested matmul does not broadcast heads), no lse."""
    import torch
    import torch.nn.functional as F

    offsets_q, offsets_k = cu_seqlens_q.to(torch.int64), cu_seqlens_k.to(torch.int64)
    used_q, used_k = int(offsets_q[-1]), int(offsets_k[-1])

    def nested(x: Any, offsets: Any, used: int) -> Any:
        return torch.nested.nested_tensor_from_jagged(x[:used], offsets=offsets).transpose(1, 2)

    out = F.scaled_dot_product_attention(nested(q, offsets_q, used_q), nested(k, offsets_k, used_k),
                                         nested(v, offsets_k, used_k), scale=scale)
    values = out.transpose(1, 2).values()
    return torch.cat([values, values.new_zeros((q.shape[0] - used_q, *values.shape[1:]))])


def torch_varlen_targets(device: str) -> list[Target]:
    """torch SDPA on jagged nested tensors (torch is imported only to ask for CUDA)."""
    if not _installed("torch"):
        return []
    if device != "cpu":
        from .adapters import _cuda_in_torch

        if not _cuda_in_torch():
            return []
    return [Target(
        TORCH_NESTED, "torch", torch_nested_sdpa, ("scale", "value_dim"), device=device, interface="varlen",
        cost=15,
        notes=("adapter: nested_tensor_from_jagged(values, offsets=cu_seqlens) for q, k, v, transposed to "
               "(B, H, j, E) for F.scaled_dot_product_attention, out read back from .values(); tokens in no segment: "
               "out 0 written by the adapter (torch is not asked about them)",
               "no causal (SDPA: no viable backend for nested tensors with is_causal=True), no GQA (the nested "
               "matmul does not broadcast heads; enable_gqa refused), no lse, no window or softcap: the varlen "
               "properties need lse, so only the dense properties (through equal segments) apply",
               "a segment with no keys gives out 0, as SPEC.md")),
    ]
