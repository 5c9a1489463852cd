"""Named cases of the blocked algorithm (SPEC.md rule 19), each with the tile it runs at: several
query and key blocks, short last blocks, every option, and the edges (fully excluded rows, -inf bias
entries, rank 2, batch dims, L > S, logits past exp's normal range). The NumPy and torch blocked
tests run all of them."""

from __future__ import annotations

from typing import Any

import numpy as np

from attention_ref.testing.assertions import assert_attention_close, assert_gradients_close, assert_within
from attention_ref.testing.cases import AttentionCase, call, call_vjp, random_cotangent


def random_inputs(seed: int, q_shape: tuple[int, ...], k_shape: tuple[int, ...], value_dim: int,
                  dtype: Any = np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Standard normal q ``q_shape``, k ``k_shape`` and v (k's shape with ``value_dim`` last) in dtype."""
    rng = np.random.default_rng(seed)
    v_shape = (*k_shape[:-1], value_dim)
    q, k, v = (rng.standard_normal(s).astype(dtype) for s in (q_shape, k_shape, v_shape))
    return q, k, v


def tile(block_q: int, block_k: int) -> dict[str, int]:
    """The keywords of a tile."""
    return {"block_q": block_q, "block_k": block_k}


def _cases() -> dict[str, tuple[AttentionCase, tuple[int, int]]]:
    rng = np.random.default_rng(0)
    cases: dict[str, tuple[AttentionCase, tuple[int, int]]] = {}
    q, k, v = random_inputs(1, (2, 6, 13, 8), (2, 2, 17, 8), 5)
    cases["gqa"] = (AttentionCase(q, k, v), (4, 5))
    bias = rng.standard_normal((6, 1, 17)).astype(np.float32)
    mask = rng.random((2, 1, 13, 17)) > 0.3
    cases["broadcast bias and mask"] = (AttentionCase(q, k, v, bias=bias, mask=mask), (3, 4))
    cases["bias of one key column"] = (AttentionCase(q, k, v, bias=rng.standard_normal((2, 6, 13, 1))
                                                     .astype(np.float32)), (5, 4))
    keep = rng.random((2, 6, 13, 1)) > 0.25  # a dropout mask broadcast along the keys
    full_keep = rng.random((2, 6, 13, 17)) > 0.4
    cases["dropout"] = (AttentionCase(q, k, v, dropout_p=0.25, dropout_mask=keep), (4, 6))
    cases["dropout, full mask, softcap"] = (AttentionCase(q, k, v, dropout_p=0.4, dropout_mask=full_keep,
                                                          softcap=1.5), (5, 3))
    cases["dropout mask with p = 0"] = (AttentionCase(q, k, v, dropout_mask=full_keep), (13, 4))
    cases["softcap and bias"] = (AttentionCase(q, k, v, softcap=0.8, bias=4 * bias, scale=2.0), (4, 4))
    cases["causal, bottom_right, window"] = (AttentionCase(q, k, v, causal=True, alignment="bottom_right",
                                                           window=(5, None)), (4, 3))
    cases["window, top_left"] = (AttentionCase(q, k, v, window=(2, 3)), (3, 2))
    ql, kl, vl = random_inputs(2, (1, 2, 19, 4), (1, 2, 7, 4), 4)
    cases["bottom_right with L > S"] = (AttentionCase(ql, kl, vl, causal=True, alignment="bottom_right"), (4, 3))
    row_mask = np.ones((13, 17), dtype=bool)
    row_mask[[0, 5, 12]] = False  # fully excluded rows
    row_mask[:, 3] = False  # a key no query attends
    inf_bias = rng.standard_normal((13, 17)).astype(np.float32)
    inf_bias[2, 7] = -np.inf  # one key excluded by its bias
    inf_bias[8] = -np.inf  # a row excluded by its bias
    cases["excluded rows, -inf bias"] = (AttentionCase(q, k, v, mask=row_mask, bias=inf_bias), (4, 5))
    r2 = random_inputs(3, (9, 6), (11, 6), 3)
    cases["rank 2, causal"] = (AttentionCase(*r2, causal=True, bias=rng.standard_normal((11,)).astype(np.float32)),
                               (2, 4))
    b3 = random_inputs(4, (2, 3, 2, 5, 4), (2, 3, 1, 6, 4), 2)
    cases["two batch dims, MQA"] = (AttentionCase(*b3, bias=rng.standard_normal((3, 1, 5, 1)).astype(np.float32)),
                                    (2, 4))
    q64, k64, v64 = random_inputs(5, (1, 4, 10, 6), (1, 2, 14, 6), 7, np.float64)
    cases["float64"] = (AttentionCase(q64, k64, v64, causal=True, bias=rng.standard_normal((4, 10, 14))), (3, 4))
    cases["float64, scale not a power of two"] = (AttentionCase(q64, k64, v64, scale=0.3, window=(3, 1)), (4, 5))
    big = random_inputs(8, (1, 2, 11, 4), (1, 2, 23, 4), 3)
    cases["logits spread past 87 (weights below the smallest normal)"] = (AttentionCase(*big, scale=12.0), (4, 5))
    big64 = random_inputs(9, (1, 2, 11, 4), (1, 2, 23, 4), 3, np.float64)
    cases["float64 logits spread past 708"] = (AttentionCase(*big64, scale=90.0, causal=True), (4, 5))
    return cases


#: name -> (case, (block_q, block_k)).
BLOCKED_CASES = _cases()


def half_precision_case(dtype: str) -> AttentionCase:
    """A float16 or bfloat16 case with GQA, a bias, causal and a window."""
    import ml_dtypes

    np_dtype = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    q, k, v = random_inputs(6, (2, 4, 11, 8), (2, 2, 15, 8), 8, np_dtype)
    bias = np.random.default_rng(7).standard_normal((4, 11, 15)).astype(np_dtype)
    return AttentionCase(q, k, v, bias=bias, causal=True, window=(6, None))


def assert_blocked_matches_oracle_and_dense(backend: Any, case: AttentionCase, blocks: tuple[int, int]) -> None:
    """out and lse of the blocked path (tile ``blocks``) in the right dtypes and within rule 19's bound
    of the oracle (exact on fully excluded rows), and the dense path's within twice it (rule 19's
    bound is at least the dense one)."""
    __tracebackhide__ = True
    block_q, block_k = blocks
    blocked = call(backend, case, return_lse=True, **tile(block_q, block_k))
    assert blocked.weights is None
    assert blocked.out.dtype == case.q.dtype and blocked.lse.dtype == np.dtype(case.default_compute_dtype)
    assert_attention_close(blocked, case, calibrated=False, key_block=block_k)
    dense = call(backend, case, return_lse=True, dense=True)
    bounds = case.bounds(calibrated=False, key_block=block_k) * 2  # rule 10: two results that must be equal
    assert_within("blocked vs dense: out", blocked.out, dense.out, bounds.out, case)
    assert_within("blocked vs dense: lse", blocked.lse, dense.lse, bounds.lse, case)


def assert_blocked_gradients_match_oracle_and_dense(backend: Any, case: AttentionCase,
                                                    blocks: tuple[int, int]) -> None:
    """dq, dk, dv, dbias of the blocked backward in the shapes and dtypes of q, k, v, bias and within
    rule 19's gradient bound of the dense float64 gradients (exactly 0 where rule 14 fixes them), and
    the dense path's within twice it."""
    __tracebackhide__ = True
    block_q, block_k = blocks
    d_out = random_cotangent(case, 11)
    expected = case.oracle_gradients(d_out)
    blocked = call_vjp(backend, case, d_out, **tile(block_q, block_k))
    for got, x in zip(blocked, (case.q, case.k, case.v, case.bias), strict=True):
        assert (got is None) == (x is None) and (got is None or (got.shape, got.dtype) == (x.shape, x.dtype))
    assert_gradients_close(blocked, case, d_out, calibrated=False, expected=expected, key_block=block_k)
    dense = call_vjp(backend, case, d_out, dense=True)
    bounds = case.gradient_bounds(d_out, expected, key_block=block_k) * 2  # the blocked bound holds the dense
    for field in ("dq", "dk", "dv", "dbias"):
        if getattr(expected, field) is not None:
            assert_within(f"blocked vs dense: {field}", getattr(blocked, field), getattr(dense, field),
                          getattr(bounds, field), case)
