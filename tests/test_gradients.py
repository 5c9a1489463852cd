"""``attention_vjp`` (SPEC.md rule 14), windows (rule 7) and ``dropout_mask`` (rule 13) beyond the
properties: the three backends agree on gradients, result types, and the public helpers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import attention_ref as ar
from attention_ref.frameworks import numpy_dtype
from attention_ref.testing.assertions import assert_within
from attention_ref.testing.cases import AttentionCase, call_vjp, random_cotangent
from attention_ref.testing.strategies import attention_cases

from .conftest import TESTED_BACKEND_NAMES, import_or_skip


@given(attention_cases(), st.integers(0, 2**32 - 1))
def test_backends_agree_on_gradients(case, seed: int) -> None:
    """Each pair of backends within the sum of their two bounds (each holds its own to the oracle)."""
    d_out = random_cotangent(case, seed)
    bounds = case.gradient_bounds(d_out, case.oracle_gradients(d_out))
    results = {name: call_vjp(ar.get_backend(name), case, d_out) for name in TESTED_BACKEND_NAMES}
    first, *others = TESTED_BACKEND_NAMES
    for other in others:
        for name in ("dq", "dk", "dv", "dbias"):
            a, b = getattr(results[first], name), getattr(results[other], name)
            if a is None:
                assert b is None
                continue
            assert_within(f"{first} vs {other}: {name}", b, a, 2 * getattr(bounds, name), case)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_gradient_types_and_shapes(backend, dtype: str) -> None:
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(shape).astype(numpy_dtype(dtype))
               for shape in ((2, 4, 3, 5), (2, 2, 6, 5), (2, 2, 6, 7)))
    bias = rng.standard_normal((4, 1, 6)).astype(np.float32 if dtype != "float64" else np.float64)
    d_out = rng.standard_normal((2, 4, 3, 7)).astype(numpy_dtype(dtype))
    convert = backend.asarray
    grads = backend.attention_vjp(convert(q), convert(k), convert(v), convert(d_out), bias=convert(bias), causal=True)
    assert isinstance(grads, ar.Gradients)
    for got, like in zip(grads, (q, k, v, bias), strict=True):
        got = backend.to_numpy(got)
        assert got.shape == like.shape and got.dtype == like.dtype
    without_bias = backend.attention_vjp(convert(q), convert(k), convert(v), convert(d_out))
    assert without_bias.dbias is None


def test_float64_compute_for_float32_inputs(backend) -> None:
    """compute_dtype='float64' gives float32 gradients computed in float64: within the float64 bound."""
    rng = np.random.default_rng(1)
    case = AttentionCase(*(rng.standard_normal(s).astype(np.float32)
                           for s in ((1, 2, 4, 3), (1, 2, 5, 3), (1, 2, 5, 3))),
                         softcap=2.0, window=(1, 2))
    d_out = rng.standard_normal((1, 2, 4, 3)).astype(np.float32)
    convert = backend.asarray
    grads = backend.attention_vjp(convert(case.q), convert(case.k), convert(case.v), convert(d_out),
                                  **case.scalar_keywords(), compute_dtype="float64")
    expected = case.oracle_gradients(d_out)
    bounds = case.gradient_bounds(d_out, expected, compute_dtype="float64")
    for name in ("dq", "dk", "dv"):
        assert_within(name, backend.to_numpy(getattr(grads, name)), getattr(expected, name), getattr(bounds, name),
                      case)


def test_torch_vjp_leaves_the_callers_graph_alone() -> None:
    torch = import_or_skip("torch")
    q, k, v = (torch.randn(1, 2, 3, 4, requires_grad=True) for _ in range(3))
    grads = ar.attention_vjp(q, k, v, torch.ones(1, 2, 3, 4))
    assert q.grad is None and not grads.dq.requires_grad
    out = ar.attention(q, k, v, causal=True)  # the forward stays differentiable by the caller
    out.sum().backward()
    assert q.grad is not None


def test_jax_vjp_under_jit() -> None:
    jax = import_or_skip("jax")
    rng = np.random.default_rng(2)
    q, k, v = (jax.numpy.asarray(rng.standard_normal((2, 3, 4)).astype(np.float32)) for _ in range(3))
    d_out = jax.numpy.ones((2, 3, 4), np.float32)
    jitted = jax.jit(lambda q, k, v, d: ar.attention_vjp(q, k, v, d, window=(1, 0)).dq)
    eager = ar.attention_vjp(q, k, v, d_out, window=(1, 0)).dq
    np.testing.assert_allclose(np.asarray(jitted(q, k, v, d_out)), np.asarray(eager), rtol=1e-6, atol=1e-6)


def test_dropout_mask_is_the_same_everywhere() -> None:
    mask = ar.dropout_mask((2, 3, 4, 5), 0.3, seed=7)
    assert mask.dtype == bool and mask.shape == (2, 3, 4, 5)
    assert np.array_equal(mask, np.random.default_rng(7).random((2, 3, 4, 5)) >= 0.3)
    assert np.array_equal(ar.dropout_mask((2, 3, 4, 5), 0.3, seed=7), mask)
    assert not np.array_equal(ar.dropout_mask((2, 3, 4, 5), 0.3, seed=8), mask)
    for name in TESTED_BACKEND_NAMES:
        backend = ar.get_backend(name)
        assert np.array_equal(backend.to_numpy(ar.dropout_mask((2, 3, 4, 5), 0.3, 7, backend=name)), mask)
    assert ar.dropout_mask((3,), 0.0, 1).all()
    with pytest.raises(ValueError, match="p must be in"):
        ar.dropout_mask((3,), 1.0, 1)


def test_window_conventions() -> None:
    """Rule 7's worked examples: window (1, 0) with L=2, S=4 is jax's top-left [[1,0,0,0],[1,1,0,0]]
    and FlashAttention's bottom-right [[0,1,1,0],[0,0,1,1]]; causal is window (None, 0)."""
    q, k = np.zeros((2, 1)), np.zeros((4, 1))
    top_left = AttentionCase(q, k, k, window=(1, 0)).positional_pattern()
    bottom_right = AttentionCase(q, k, k, window=(1, 0), alignment="bottom_right").positional_pattern()
    assert top_left.astype(int).tolist() == [[1, 0, 0, 0], [1, 1, 0, 0]]
    assert bottom_right.astype(int).tolist() == [[0, 1, 1, 0], [0, 0, 1, 1]]
    for alignment in ("top_left", "bottom_right"):
        causal = AttentionCase(q, k, k, causal=True, alignment=alignment).positional_pattern()
        window = AttentionCase(q, k, k, window=(None, 0), alignment=alignment).positional_pattern()
        assert np.array_equal(causal, window)
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal(s) for s in ((2, 3), (4, 3), (4, 2)))
    for name in TESTED_BACKEND_NAMES:
        backend = ar.get_backend(name)
        out = backend.to_numpy(backend.attention(*(backend.asarray(x) for x in (q, k, v)), window=(1, 0),
                                                 alignment="bottom_right", return_weights=True).weights)
        assert np.array_equal(out != 0, bottom_right), name
        huge = backend.attention(*(backend.asarray(x) for x in (q, k, v)), window=(2**40, 2**40))
        plain = backend.attention(*(backend.asarray(x) for x in (q, k, v)))
        assert np.array_equal(backend.to_numpy(huge), backend.to_numpy(plain)), name
