"""The multi-head attention layer (SPEC.md rules 15-18): every backend against the float64 oracle
within the layer rule, one error per bad input on every backend, exact key-padding semantics, and
gradients against finite differences."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attention_ref as ar
from attention_ref.layers import MHAParams
from attention_ref.testing.layer_cases import LayerCase
from attention_ref.testing.layer_strategies import layer_cases, random_params
from attention_ref.tolerance import UNIT_ROUNDOFF

from .conftest import BACKENDS


def _run(backend: str, case: LayerCase, **flags: Any) -> Any:
    be = ar.get_backend(backend)

    def convert(x: Any) -> Any:
        return None if x is None else be.asarray(np.asarray(x))

    keywords = {name: convert(x) if isinstance(x, np.ndarray) else x for name, x in case.keywords().items()}
    result = ar.multi_head_attention(convert(case.query), convert(case.key), convert(case.value),
                                     case.params.map(convert), backend=backend, **keywords, **flags)
    if isinstance(result, ar.AttentionOutput):
        return ar.AttentionOutput(*(None if x is None else be.to_numpy(x) for x in result))
    return be.to_numpy(result)


def _examples(backend: str, examples: int) -> int:
    """Examples per backend: a third for jax, whose layer program compiles once per shape (the
    per-head attention it runs is proven on bucketed shapes by the attention properties)."""
    return max(1, examples // 3) if backend == "jax" else examples


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_matches_the_float64_oracle(backend: str) -> None:
    """Rule 15/17: out in the input dtype and shape, within the layer rule of the exact answer; the
    per-head weights, before dropout, within the attention rule (rule 11)."""

    @settings(max_examples=_examples(backend, 40), deadline=None)
    @given(case=layer_cases())
    def check(case: LayerCase) -> None:
        _check_against_oracle(backend, case)

    check()


def _check_against_oracle(backend: str, case: LayerCase) -> None:
    result = _run(backend, case, return_weights=True)
    oracle, bounds = case.oracle(), case.bounds()
    assert result.out.dtype == case.query.dtype
    assert result.out.shape == oracle.out.shape
    assert np.all(np.abs(result.out.astype(np.float64) - oracle.out) <= bounds.out)
    assert result.weights.shape == oracle.weights.shape
    assert np.all(np.abs(result.weights - oracle.weights) <= bounds.weights)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_padded_rows_give_the_output_bias(backend: str) -> None:
    """Rule 16 with rule 8: a batch element whose keys are all padding attends nothing: o is 0 and
    out is exactly bo, never NaN; its weights are 0."""
    rng = np.random.default_rng(1)
    dims = dict(d_q=6, d_k=6, d_v=6, H=2, Hkv=2, hd=3, hd_v=3, d_out=5)
    params = random_params(rng, dims=dims, biases=(True, True, True, True), dtype=np.dtype("float32"))
    x = rng.standard_normal((2, 4, 6)).astype(np.float32)
    padding = np.array([[True, True, False, True], [False] * 4])
    case = LayerCase(query=x, key=x, value=x, params=params, key_padding_mask=padding)
    result = _run(backend, case, return_weights=True)
    np.testing.assert_array_equal(result.out[1], np.broadcast_to(params.bo, (4, 5)))
    np.testing.assert_array_equal(result.weights[1], 0.0)
    np.testing.assert_array_equal(result.weights[0][..., 2], 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_key_padding_is_the_mask_it_stands_for(backend: str) -> None:
    """Rule 16: ``key_padding_mask`` (True = a real token) gives exactly what the mask
    ``padding[..., None, None, :]`` gives."""
    rng = np.random.default_rng(2)
    dims = dict(d_q=5, d_k=4, d_v=3, H=4, Hkv=2, hd=3, hd_v=2, d_out=6)
    params = random_params(rng, dims=dims, biases=(True, False, True, False), dtype=np.dtype("float32"))
    query, key, value = (rng.standard_normal((2, n, d)).astype(np.float32) for n, d in ((3, 5), (6, 4), (6, 3)))
    padding = rng.random((2, 6)) < 0.6
    mask = rng.random((2, 4, 3, 6)) < 0.7
    padded = _run(backend, LayerCase(query=query, key=key, value=value, params=params, key_padding_mask=padding,
                                     mask=mask))
    masked = _run(backend, LayerCase(query=query, key=key, value=value, params=params,
                                     mask=mask & padding[:, None, None, :]))
    np.testing.assert_array_equal(padded, masked)


def _bad_calls() -> list[tuple[str, dict[str, Any]]]:
    rng = np.random.default_rng(3)
    dims = dict(d_q=4, d_k=4, d_v=4, H=2, Hkv=1, hd=2, hd_v=3, d_out=4)
    good = random_params(rng, dims=dims, biases=(True, True, True, True), dtype=np.dtype("float32"))
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    base = dict(query=x, key=x, value=x, params=good)
    return [
        ("params as a tuple", {**base, "params": tuple(good)}),
        ("params of another dtype", {**base, "params": good.map(lambda a: a.astype(np.float64))}),
        ("query features", {**base, "query": x[..., :3]}),
        ("wo heads", {**base, "params": good._replace(wo=good.wo[:1])}),
        ("bk shape", {**base, "params": good._replace(bk=good.bk[:, :1])}),
        ("heads not a multiple", {**base, "params": good._replace(wk=np.zeros((4, 3, 2), np.float32),
                                                                   wv=np.zeros((4, 3, 3), np.float32),
                                                                   bk=None, bv=None)}),
        ("key padding not bool", {**base, "key_padding_mask": np.ones((2, 3), np.float32)}),
        ("key padding shape", {**base, "key_padding_mask": np.ones((2, 4), bool)}),
        ("mask shape", {**base, "mask": np.ones((2, 2, 3, 4), bool)}),
        ("rank 1 query", {**base, "query": x[0, 0], "key": x[0, 0], "value": x[0, 0]}),
        ("batch dims", {**base, "key": x[:1]}),
    ]


@pytest.mark.parametrize(("what", "call"), _bad_calls(), ids=[name for name, _ in _bad_calls()])
def test_every_backend_raises_the_same_error(what: str, call: dict[str, Any]) -> None:
    """Rule 12 for the layer: the same exception type and message on every backend."""
    errors = []
    for name in ("numpy", "jax", "torch"):
        be = ar.get_backend(name)

        def convert(x: Any, be: Any = be) -> Any:
            if isinstance(x, np.ndarray):
                return be.asarray(x)
            if isinstance(x, MHAParams):
                return x.map(convert)
            return tuple(convert(a) for a in x) if isinstance(x, tuple) else x

        converted = {key: convert(value) for key, value in call.items()}
        with pytest.raises((TypeError, ValueError)) as info:
            ar.multi_head_attention(converted.pop("query"), converted.pop("key"), converted.pop("value"),
                                    converted.pop("params"), backend=name, **converted)
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1] == errors[2], errors


def test_params_and_inputs_must_be_arrays_of_the_backend() -> None:
    rng = np.random.default_rng(4)
    dims = dict(d_q=4, d_k=4, d_v=4, H=1, Hkv=1, hd=2, hd_v=2, d_out=4)
    params = random_params(rng, dims=dims, biases=(False,) * 4, dtype=np.dtype("float32"))
    x = ar.get_backend("torch").asarray(np.ones((3, 4), np.float32))
    with pytest.raises(TypeError, match="all arrays must come from one framework"):
        ar.multi_head_attention(x, x, x, params)


def _objective(case: LayerCase, d_out: np.ndarray) -> float:
    out = ar.multi_head_attention(case.query, case.key, case.value, case.params, backend="numpy", **case.keywords())
    return float(np.sum(out * d_out))


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_gradients_match_finite_differences(backend: str) -> None:
    """Rule 18: see ``_check_gradients``."""

    @settings(max_examples=_examples(backend, 15), deadline=None)
    @given(case=layer_cases(dtypes=("float64",), max_length=4, max_features=5), seed=st.integers(0, 2**16))
    def check(case: LayerCase, seed: int) -> None:
        _check_gradients(backend, case, seed)

    check()


def _check_gradients(backend: str, case: LayerCase, seed: int) -> None:
    """Rule 18: the directional derivative of ``sum(out * d_out)`` along a random direction of every
    input and parameter, from the backend's gradients, equals a Richardson-extrapolated central
    difference of the float64 layer. Tolerance: the difference of the two estimates (the
    extrapolation's truncation error) plus the forward passes' rounding (the layer rule, weighted by
    |d_out|) over the step, plus float64 rounding of the gradient sum (one u per term)."""
    rng = np.random.default_rng(seed)
    d_out = rng.standard_normal(case.oracle().out.shape)
    be = ar.get_backend(backend)

    def convert(x: Any) -> Any:
        return None if x is None else be.asarray(np.asarray(x))

    keywords = {name: convert(x) if isinstance(x, np.ndarray) else x for name, x in case.keywords().items()}
    grads = ar.multi_head_attention_vjp(convert(case.query), convert(case.key), convert(case.value),
                                        case.params.map(convert), convert(d_out), backend=backend, **keywords)
    names = ["query", "key", "value"]
    base = {name: getattr(case, name) for name in names} | {f"params.{n}": x for n, x in case.params._asdict().items()
                                                             if x is not None}
    gradient = {name: be.to_numpy(getattr(grads, "d_" + name)) for name in names}
    gradient |= {f"params.{n}": be.to_numpy(g) for n, g in grads.params._asdict().items() if g is not None}
    assert set(gradient) == set(base)
    direction = {name: rng.standard_normal(x.shape) for name, x in base.items()}
    analytic = sum(float(np.sum(gradient[n] * direction[n])) for n in base)

    def moved(step: float) -> LayerCase:
        arrays = {n: base[n] + step * direction[n] for n in base}
        params = case.params._replace(**{n.removeprefix("params."): a for n, a in arrays.items()
                                         if n.startswith("params.")})
        return case.replace(query=arrays["query"], key=arrays["key"], value=arrays["value"], params=params)

    step, estimates, rounding = 1e-4, [], 0.0
    for h in (step, step / 2):
        plus, minus = moved(h), moved(-h)
        estimates.append((_objective(plus, d_out) - _objective(minus, d_out)) / (2 * h))
        rounding += sum(float(np.sum(np.abs(d_out) * c.bounds().out)) for c in (plus, minus)) / (2 * h)
    extrapolated = (4 * estimates[1] - estimates[0]) / 3
    terms = sum(x.size for x in base.values()) + case.oracle().weights.size
    own = terms * UNIT_ROUNDOFF["float64"] * sum(float(np.sum(np.abs(gradient[n] * direction[n]))) for n in base)
    tolerance = abs(estimates[1] - estimates[0]) + 2 * rounding + own
    assert abs(analytic - extrapolated) <= tolerance, (analytic, extrapolated, tolerance)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_gradients_have_the_arrays_dtypes(backend: str) -> None:
    """Rule 18: every gradient in its array's shape and dtype; None for an absent bias."""
    import ml_dtypes

    rng = np.random.default_rng(5)
    dims = dict(d_q=4, d_k=3, d_v=2, H=2, Hkv=1, hd=2, hd_v=3, d_out=5)
    params = random_params(rng, dims=dims, biases=(True, False, True, False), dtype=np.dtype(ml_dtypes.bfloat16))
    be = ar.get_backend(backend)
    arrays = [be.asarray(rng.standard_normal(s).astype(ml_dtypes.bfloat16)) for s in ((2, 3, 4), (2, 5, 3), (2, 5, 2),
                                                                                       (2, 3, 5))]
    grads = ar.multi_head_attention_vjp(*arrays[:3], params.map(be.asarray), arrays[3], backend=backend)
    for got, want in zip((grads.d_query, grads.d_key, grads.d_value, *grads.params), (*arrays[:3], *params),
                         strict=True):
        if want is None:
            assert got is None
        else:
            assert (tuple(got.shape), str(got.dtype).removeprefix("torch.")) == (tuple(want.shape), "bfloat16")
