"""SPEC.md transcribed literally, one query at a time, in Python floats (float64, math.fsum).

Deliberately naive and independent of every backend: no broadcasting tricks, no vectorised softmax.
It is the check on the NumPy oracle itself. It transcribes the forward computation only: the inputs
are assumed valid (rule 12: the front door rejects the others before any computation), and no
gradient is transcribed (rule 14: gradients are checked against the NumPy backend's analytic
backward pass and against finite differences, ``attention_ref.testing.finite_differences``).
"""

from __future__ import annotations

import math

import numpy as np

from attention_ref.testing import AttentionCase


def transcribed_attention(case: AttentionCase) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(out, weights, lse) of SPEC.md for the case (rule 11: the three results), computed in float64
    on the inputs as given (rule 10: a float64 answer on the same rounded inputs, as the oracle is)."""
    # rule 12: the case is assumed valid (shapes, dtypes, options); nothing here re-checks it.
    q, k, v = (np.asarray(x, np.float64) for x in (case.q, case.k, case.v))
    if q.ndim == 2:  # rule 1: a rank-2 input is one head
        q, k, v = q[None], k[None], v[None]
    heads_shape = q.shape[:-2]
    n_q_heads, n_kv_heads = q.shape[-3], k.shape[-3]
    length, keys, value_dim = q.shape[-2], k.shape[-2], v.shape[-1]
    logits_shape = case.logits_shape
    mask = np.ones(logits_shape, bool) if case.mask is None else np.broadcast_to(case.mask, logits_shape)
    bias = None if case.bias is None else np.broadcast_to(np.asarray(case.bias, np.float64), logits_shape)
    keep = None if case.dropout_mask is None else np.broadcast_to(case.dropout_mask, logits_shape)
    mask, bias, keep = (None if x is None else x.reshape((*heads_shape, length, keys)) for x in (mask, bias, keep))
    scale = 1 / math.sqrt(q.shape[-1]) if case.scale is None else case.scale  # rule 3

    out = np.zeros((*heads_shape, length, value_dim))
    weights = np.zeros((*heads_shape, length, keys))
    lse = np.full((*heads_shape, length), -math.inf)
    for index in np.ndindex(*heads_shape):
        *batch, head = index
        kv_index = (*batch, head // (n_q_heads // n_kv_heads))  # rule 2
        for i in range(length):
            logits, attended = [], []
            for j in range(keys):
                # rule 10: float64 products, each sum correctly rounded (math.fsum)
                logit = scale * math.fsum(a * b for a, b in zip(q[index][i], k[kv_index][j], strict=True))
                if case.softcap is not None:  # rule 4
                    logit = case.softcap * math.tanh(logit / case.softcap)
                if bias is not None:  # rule 5
                    logit += bias[index][i, j]
                allowed = bool(mask[index][i, j])  # rule 6
                offset = 0 if case.alignment == "top_left" else keys - length
                if case.causal:  # rule 7
                    allowed = allowed and j <= i + offset
                if case.window is not None:  # rule 7: i + offset - left <= j <= i + offset + right
                    left, right = case.window
                    allowed = allowed and (left is None or i + offset - left <= j)
                    allowed = allowed and (right is None or j <= i + offset + right)
                allowed = allowed and logit != -math.inf  # rule 8
                logits.append(logit)
                attended.append(allowed)
            if not any(attended):
                continue  # rule 8: out 0, weights 0, lse -inf
            # rule 9: the row max over the attended keys only, subtracted before exp
            top = max(x for x, a in zip(logits, attended, strict=True) if a)
            exps = [math.exp(x - top) if a else 0.0 for x, a in zip(logits, attended, strict=True)]
            total = math.fsum(exps)
            for j in range(keys):
                weights[index][i, j] = exps[j] / total
            # rule 13: kept probabilities times 1 / (1 - p), dropped ones 0
            dropped = [weights[index][i, j] * (1.0 if keep is None else keep[index][i, j] / (1 - case.dropout_p))
                       for j in range(keys)]
            for c in range(value_dim):
                out[index][i, c] = math.fsum(dropped[j] * v[kv_index][j, c] for j in range(keys))
            lse[index][i] = top + math.log(total)  # rule 11: natural-log log-sum-exp of the final logits
    shape = case.logits_shape[:-2]
    return (out.reshape((*shape, length, value_dim)), weights.reshape(case.logits_shape),
            lse.reshape((*shape, length)))
