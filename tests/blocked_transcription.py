"""SPEC.md rule 19's online softmax transcribed literally, one query row at a time, every operation
rounded to the compute dtype (NumPy scalars of that dtype, sequential sums).

Independent of every backend: it checks that rule 19's tolerance terms hold for the algorithm the
rule prescribes, with the worst tiling (key blocks of 1: a rescaling after every key). The inputs
are assumed valid (rule 12).
"""

from __future__ import annotations

import math

import numpy as np

from attention_ref.testing import AttentionCase


def transcribed_online_softmax(case: AttentionCase, block_k: int) -> tuple[np.ndarray, np.ndarray]:
    """(out, lse) of rule 19's forward for the case, in its spec compute dtype, with key blocks of
    ``block_k`` (out rounded to the input dtype, lse in the compute dtype)."""
    compute = np.dtype(case.default_compute_dtype).type
    q, k, v = (np.asarray(x).astype(compute) for x in (case.q, case.k, case.v))  # rule 10: exact widening
    if q.ndim == 2:  # rule 1: a rank-2 input is one head
        q, k, v = q[None], k[None], v[None]
    heads_shape = q.shape[:-2]
    n_q_heads, n_kv_heads = q.shape[-3], k.shape[-3]
    length, keys, value_dim = q.shape[-2], k.shape[-2], v.shape[-1]
    logits_shape = case.logits_shape
    full = (*heads_shape, length, keys)
    mask = np.ones(full, bool) if case.mask is None else np.broadcast_to(case.mask, logits_shape).reshape(full)
    bias = None if case.bias is None else np.broadcast_to(case.bias, logits_shape).reshape(full).astype(compute)
    keep = None if case.dropout_mask is None else np.broadcast_to(case.dropout_mask, logits_shape).reshape(full)
    scale = compute(1 / math.sqrt(q.shape[-1]) if case.scale is None else case.scale)  # rule 3
    softcap = None if case.softcap is None else compute(case.softcap)
    dropout_scale = compute(1 / (1 - case.dropout_p))
    zero, minus_inf = compute(0), compute(-np.inf)
    offset = 0 if case.alignment == "top_left" else keys - length

    out = np.zeros((*heads_shape, length, value_dim), compute)
    lse = np.full((*heads_shape, length), minus_inf)
    for index in np.ndindex(*heads_shape):
        *batch, head = index
        kv_index = (*batch, head // (n_q_heads // n_kv_heads))  # rule 2
        for i in range(length):
            m, total, acc = minus_inf, zero, [zero] * value_dim
            for start in range(0, keys, block_k):  # rule 19: key blocks in increasing order
                block = range(start, min(start + block_k, keys))
                logits = []
                for j in block:
                    dot = zero
                    for e in range(q.shape[-1]):
                        dot = compute(dot + compute(q[index][i, e] * k[kv_index][j, e]))
                    x = compute(scale * dot)
                    if softcap is not None:  # rule 4
                        x = compute(softcap * compute(np.tanh(compute(x / softcap))))
                    if bias is not None:  # rule 5
                        x = compute(x + bias[index][i, j])
                    allowed = bool(mask[index][i, j])  # rule 6
                    if case.causal:  # rule 7
                        allowed = allowed and j <= i + offset
                    if case.window is not None:
                        left, right = case.window
                        allowed = allowed and (left is None or i + offset - left <= j)
                        allowed = allowed and (right is None or j <= i + offset + right)
                    logits.append(x if allowed else minus_inf)  # rule 8: -inf excludes
                m_new = max([m, *logits])
                s = m_new if m_new > minus_inf else zero
                alpha = compute(np.exp(compute(m - s)))
                total = compute(alpha * total)
                acc = [compute(alpha * a) for a in acc]
                for j, x in zip(block, logits, strict=True):
                    p = compute(np.exp(compute(x - s)))
                    total = compute(total + p)
                    z = p if keep is None else compute(p * (dropout_scale if keep[index][i, j] else zero))
                    acc = [compute(a + compute(z * v[kv_index][j, c])) for c, a in enumerate(acc)]
                m = m_new
            if total > zero:  # rule 8: otherwise out 0 and lse -inf
                out[index][i] = [compute(a / total) for a in acc]
                lse[index][i] = compute(m + compute(np.log(total)))
    shape = case.logits_shape[:-2]
    return (out.reshape((*shape, length, value_dim)).astype(np.asarray(case.q).dtype),
            lse.reshape((*shape, length)))
