"""Self-check of the kernel catalogue (tests/kernels.py) on fixed cases, without Hypothesis.

The correct kernels must match the float64 oracle within the tolerance rule of
``attention_ref/tolerance.py`` on every case; every buggy kernel must fail that same comparison on at least one case within its
``supports``, so its bug is observable.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import pytest

from .conftest import import_or_skip

torch = import_or_skip("torch")

import numpy as np  # noqa: E402

import attention_ref as ar  # noqa: E402
from attention_ref.result import AttentionOutput  # noqa: E402
from attention_ref.testing import AttentionCase  # noqa: E402
from attention_ref.testing.assertions import assert_matches  # noqa: E402

from .kernels import ALL_FEATURES, BUGGY_KERNELS, CORRECT_KERNELS  # noqa: E402

B, HQ, E, EV = 2, 4, 16, 8
SIZES = [(length, keys) for length in (1, 5, 70) for keys in (0, 3, 70, 130)]

#: name -> (features, keyword arguments); every config but "plain" uses GQA (Hkv = 2).
CONFIGS: dict[str, tuple[frozenset[str], dict[str, Any]]] = {
    "plain": (frozenset(), {}),
    "gqa": (frozenset({"gqa", "lse", "weights"}), {}),
    "lse_only": (frozenset({"gqa", "lse"}), {}),
    "weights_only": (frozenset({"gqa", "weights"}), {}),
    "mask": (frozenset({"gqa", "mask", "lse", "weights"}), {}),
    "bias": (frozenset({"gqa", "bias", "lse", "weights"}), {}),
    "causal": (frozenset({"gqa", "causal", "lse", "weights"}), {"causal": True}),
    "bottom_right": (frozenset({"gqa", "causal", "bottom_right", "lse", "weights"}),
                     {"causal": True, "alignment": "bottom_right"}),
    "softcap": (frozenset({"gqa", "softcap", "lse", "weights"}), {"softcap": 5.0}),
    "scale": (frozenset({"gqa", "scale", "lse", "weights"}), {"scale": 0.37}),
    "all_top_left": (frozenset(ALL_FEATURES) - {"bottom_right"},
                     {"causal": True, "softcap": 5.0, "scale": 0.37}),
    "all_bottom_right": (frozenset(ALL_FEATURES),
                         {"causal": True, "alignment": "bottom_right", "softcap": 5.0, "scale": 0.37}),
}


@dataclass
class Case:
    name: str
    features: frozenset[str]
    q: Any
    k: Any
    v: Any
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def compute_dtype(self) -> Any:
        return torch.float64 if self.q.dtype == torch.float64 else torch.float32


def _make_case(seed: int, config: str, length: int, keys: int, dtype: Any, *, large: bool = False) -> Case:
    features, kwargs = CONFIGS[config]
    g = torch.Generator().manual_seed(seed)
    hkv = 2 if "gqa" in features else HQ
    if large:  # integer q and k: exact logits of magnitude ~1e3 (exp overflows without the max)
        q = torch.randint(-40, 41, (B, HQ, length, E), generator=g).to(dtype)
        k = torch.randint(-40, 41, (B, hkv, keys, E), generator=g).to(dtype)
    else:
        q = torch.randn(B, HQ, length, E, generator=g, dtype=torch.float64).to(dtype)
        k = torch.randn(B, hkv, keys, E, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, hkv, keys, EV, generator=g, dtype=torch.float64).to(dtype)
    kwargs = dict(kwargs)
    if "mask" in features:
        mask = torch.rand(B, HQ, length, keys, generator=g) < 0.75
        mask[0, 1, -1, :] = False  # one fully masked row
        kwargs["mask"] = mask
    if "bias" in features:  # (Hq, L, S): broadcast over the batch
        bias = torch.randn(HQ, length, keys, generator=g, dtype=torch.float64)
        bias[torch.rand(HQ, length, keys, generator=g) < 0.1] = -math.inf
        bias[2, 0, :] = -math.inf  # one fully excluded row (head 2, query 0, every batch element)
        kwargs["bias"] = bias.to(dtype)
    kwargs["return_weights"] = "weights" in features
    kwargs["return_lse"] = "lse" in features
    name = f"{config}-L{length}-S{keys}-{str(dtype).removeprefix('torch.')}{'-large' if large else ''}"
    return Case(name, features, q, k, v, kwargs)


def _build_cases() -> list[Case]:
    cases = [_make_case(seed, config, length, keys, dtype)
             for seed, (config, (length, keys), dtype) in enumerate(
                 (c, s, d) for c in CONFIGS for s in SIZES for d in (torch.float32, torch.float64))]
    for length, keys in ((5, 70), (70, 130)):
        for dtype in (torch.float32, torch.float64):  # large logits: overflow and underflow
            cases += [_make_case(len(cases), config, length, keys, dtype, large=True) for config in ("gqa", "mask")]
        for dtype in (torch.float16, torch.bfloat16):  # half precision inputs, float32 compute
            cases += [_make_case(len(cases), config, length, keys, dtype) for config in ("gqa", "all_bottom_right")]
    return cases


CASES = _build_cases()


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """Small tensors: one intra-op thread is fastest, and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def _spec(index: int) -> tuple[AttentionCase, AttentionOutput, Any]:
    """The case as an AttentionCase, its float64 oracle and the tolerance rule's bounds."""
    case = CASES[index]
    backend = ar.get_backend("torch")
    numpy_args = {name: backend.to_numpy(case.kwargs[name]) for name in ("mask", "bias") if name in case.kwargs}
    options = {name: case.kwargs[name] for name in ("scale", "causal", "alignment", "softcap") if name in case.kwargs}
    spec_case = AttentionCase(*(backend.to_numpy(x) for x in (case.q, case.k, case.v)), **numpy_args, **options)
    oracle = spec_case.oracle()
    return spec_case, oracle, spec_case.bounds(oracle=oracle)


def _check(index: int, result: Any) -> None:
    """Raise AssertionError unless ``result`` is the correct answer to case ``index``."""
    case = CASES[index]
    spec_case, oracle, bounds = _spec(index)
    want_weights, want_lse = case.kwargs["return_weights"], case.kwargs["return_lse"]
    if want_weights or want_lse:
        assert isinstance(result, tuple) and len(result) == 3, f"expected (out, weights, lse), got {type(result)}"
        out, weights, lse = result
        assert (weights is not None) == want_weights, "weights returned iff requested"
        assert (lse is not None) == want_lse, "lse returned iff requested"
    else:
        assert isinstance(result, torch.Tensor), f"expected the out tensor, got {type(result)}"
        out, weights, lse = result, None, None
    for name, x, dtype, shape in (("out", out, case.q.dtype, oracle.out.shape),
                                  ("weights", weights, case.compute_dtype, oracle.weights.shape),
                                  ("lse", lse, case.compute_dtype, oracle.lse.shape)):
        if x is not None:
            assert x.dtype == dtype and tuple(x.shape) == shape, \
                f"{name}: {x.dtype} {tuple(x.shape)}, expected {dtype} {shape}"
    backend = ar.get_backend("torch")
    numpy_result = AttentionOutput(*(None if x is None else backend.to_numpy(x) for x in (out, weights, lse)))
    assert_matches(numpy_result, oracle, bounds, spec_case)


def _run(kernel: Any, index: int) -> Any:
    case = CASES[index]
    return kernel(case.q, case.k, case.v, **case.kwargs)


def test_cases_cover_the_features() -> None:
    assert len(BUGGY_KERNELS) >= 24
    for name, (kernel, supports, description) in BUGGY_KERNELS.items():
        assert callable(kernel) and description, name
        assert set(supports) <= set(ALL_FEATURES), name
    # every case, fully excluded rows included, is one the oracle answers without NaN
    for index in range(len(CASES)):
        _, expected, _ = _spec(index)
        assert not any(np.isnan(x).any() for x in expected), CASES[index].name


@pytest.mark.parametrize("name", list(CORRECT_KERNELS))
def test_correct_kernel_matches_the_oracle(name: str) -> None:
    failures = []
    for index, case in enumerate(CASES):
        try:
            _check(index, _run(CORRECT_KERNELS[name], index))
        except AssertionError as error:
            failures.append(f"{case.name}: {str(error).splitlines()[0]}")
    assert not failures, f"{len(failures)} of {len(CASES)} cases fail:\n" + "\n".join(failures[:20])


@pytest.mark.parametrize("name", list(BUGGY_KERNELS))
def test_buggy_kernel_is_observable(name: str) -> None:
    kernel, supports, _ = BUGGY_KERNELS[name]
    eligible = [index for index, case in enumerate(CASES) if case.features <= set(supports)]
    for index in eligible:
        try:
            _check(index, _run(kernel, index))
        except AssertionError:
            return
    pytest.fail(f"{name}: the bug is not observable on any of the {len(eligible)} fixed cases in its supports")
