"""Rule 1: zero-size dims are valid and give empty (or, with S = 0, zero) results on every backend."""

from __future__ import annotations

import numpy as np
import pytest

from attention_ref.testing import AttentionCase, call

SHAPES = {  # q, k, v
    "L = 0": ((2, 0, 4), (2, 5, 4), (2, 5, 3)),
    "S = 0": ((2, 3, 4), (2, 0, 4), (2, 0, 3)),
    "Ev = 0": ((2, 3, 4), (2, 5, 4), (2, 5, 0)),
    "batch of 0": ((0, 2, 3, 4), (0, 1, 5, 4), (0, 1, 5, 3)),
    "Hq = 0": ((0, 3, 4), (1, 5, 4), (1, 5, 3)),
    "rank 2, S = 0": ((3, 4), (0, 4), (0, 3)),
}


@pytest.mark.parametrize("shapes", SHAPES.values(), ids=SHAPES.keys())
def test_empty_shapes(backend: object, shapes: tuple[tuple[int, ...], ...]) -> None:
    q, k, v = (np.ones(shape, np.float32) for shape in shapes)
    case = AttentionCase(q, k, v, causal=True, alignment="bottom_right")
    result = call(backend, case, return_weights=True, return_lse=True)
    assert result.out.shape == (*q.shape[:-1], v.shape[-1]) and result.out.dtype == np.float32
    assert result.weights.shape == (*q.shape[:-1], k.shape[-2])
    assert result.lse.shape == q.shape[:-1]
    np.testing.assert_array_equal(result.out, 0)  # empty, or all rows fully excluded
    if k.shape[-2] == 0:
        assert np.all(result.lse == -np.inf)
