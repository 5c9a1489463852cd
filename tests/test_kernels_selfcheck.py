"""Self-check of the bug zoo (tests/zoo/) on fixed cases, without Hypothesis.

The correct kernels must match the float64 oracle within the tolerance rule of
``attention_ref/tolerance/`` (out, weights, lse and, for cases with ``grad``, dq, dk, dv and dbias)
on every case within their ``supports``; every bug of the zoo must fail that same comparison on at
least one case within its ``supports``, so that its bug is observable with the features it is
checked with.
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
from attention_ref.features import KERNEL_FEATURES  # noqa: E402
from attention_ref.result import AttentionOutput, Gradients  # noqa: E402
from attention_ref.testing import AttentionCase, assert_gradients_close  # noqa: E402
from attention_ref.testing.assertions import assert_matches  # noqa: E402

from .zoo import ALL_FEATURES, BUGS, BUGS_BY_NAME, CORRECT_KERNELS, TILED_FEATURES  # noqa: E402

B, HQ, E, EV = 2, 4, 16, 8
SIZES = [(length, keys) for length in (1, 5, 70) for keys in (0, 3, 70, 130)]
#: The sizes of the narrow configs (one or two features, there to observe the bugs checked with them):
#: a decode step, no keys, L < S past two tiles of 32, L > S... past four.
FEW_SIZES = [(1, 3), (5, 0), (5, 70), (70, 130)]
DROPOUT_P = 0.25

#: name -> (features, keyword arguments, sizes). Every feature a config uses is in its features: ``gqa``
#: (Hkv = 2, else Hkv = Hq), ``value_dim`` (Ev = 8, else Ev = E), ``mask`` (one fully masked row),
#: ``bias`` (-inf entries, one fully excluded row), ``lse`` and ``weights`` (returned), ``dropout``
#: (a keep-mask with p = 0.25), ``grad`` (gradients compared too) and ``dbias`` (the bias's).
CONFIGS: dict[str, tuple[frozenset[str], dict[str, Any], list[tuple[int, int]]]] = {
    name: (frozenset(features), kwargs, sizes) for name, features, kwargs, sizes in [
        ("plain", (), {}, SIZES),
        ("value_dim", ("value_dim",), {}, FEW_SIZES),
        ("gqa", ("gqa",), {}, FEW_SIZES),
        ("weights", ("weights",), {}, SIZES),
        ("lse", ("lse",), {}, SIZES),
        ("gqa_lse_weights", ("gqa", "lse", "weights"), {}, SIZES),
        ("mask", ("mask",), {}, FEW_SIZES),
        ("mask_lse_weights", ("gqa", "mask", "lse", "weights"), {}, SIZES),
        ("bias", ("bias",), {}, FEW_SIZES),
        ("bias_lse_weights", ("gqa", "bias", "lse", "weights"), {}, SIZES),
        ("scale", ("scale",), {"scale": 0.37}, SIZES),
        ("causal", ("causal",), {"causal": True}, SIZES),
        ("bottom_right", ("causal", "bottom_right"), {"causal": True, "alignment": "bottom_right"}, SIZES),
        ("softcap", ("softcap",), {"softcap": 5.0}, SIZES),
        ("bias_softcap", ("bias", "softcap"), {"softcap": 5.0}, FEW_SIZES),
        ("window", ("window",), {"window": (3, 1)}, FEW_SIZES),
        ("window_bottom_right", ("window", "bottom_right"), {"window": (3, 1), "alignment": "bottom_right"},
         FEW_SIZES),
        ("window_causal", ("window", "causal", "bottom_right", "lse", "weights"),
         {"window": (4, None), "causal": True, "alignment": "bottom_right"}, FEW_SIZES),
        ("dropout", ("dropout",), {"dropout_p": DROPOUT_P}, FEW_SIZES),
        ("dropout_weights", ("dropout", "weights"), {"dropout_p": DROPOUT_P}, FEW_SIZES),
        ("grad", ("grad",), {}, FEW_SIZES),
        ("grad_gqa", ("grad", "gqa"), {}, FEW_SIZES),
        ("grad_mask", ("grad", "mask"), {}, FEW_SIZES),
        ("grad_bias", ("grad", "bias", "dbias"), {}, FEW_SIZES),
        ("grad_softcap", ("grad", "softcap"), {"softcap": 5.0}, FEW_SIZES),
        ("grad_dropout", ("grad", "dropout"), {"dropout_p": DROPOUT_P}, FEW_SIZES),
        ("all_top_left", set(TILED_FEATURES) - {"bottom_right"}, {"causal": True, "softcap": 5.0, "scale": 0.37},
         SIZES),
        ("all_bottom_right", TILED_FEATURES,
         {"causal": True, "alignment": "bottom_right", "softcap": 5.0, "scale": 0.37}, SIZES),
        ("mask_mod", ("mask_mod",), {"mask_mod": ar.flex.causal_mask(0)}, SIZES),
        ("score_mod", ("score_mod",), {"score_mod": ar.flex.alibi(ar.flex.alibi_slopes(HQ))}, FEW_SIZES),
        ("score_mod_softcap", ("score_mod", "softcap"), {"score_mod": lambda s, b, h, i, j: 2 * s, "softcap": 5.0},
         FEW_SIZES),
        ("score_mod_gqa", ("score_mod", "gqa"), {"score_mod": ar.flex.alibi(ar.flex.alibi_slopes(HQ))}, FEW_SIZES),
        ("everything", ALL_FEATURES, {"causal": True, "alignment": "bottom_right", "softcap": 5.0, "scale": 0.37,
                                      "window": (6, 2), "dropout_p": DROPOUT_P}, SIZES),
    ]
}


@dataclass
class Case:
    name: str
    features: frozenset[str]
    q: Any
    k: Any
    v: Any
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: The options of the same call without its score or mask program (rule 22), for the oracle.
    spec: dict[str, Any] = field(default_factory=dict)

    @property
    def compute_dtype(self) -> Any:
        return torch.float64 if self.q.dtype == torch.float64 else torch.float32


def _make_case(seed: int, config: str, length: int, keys: int, dtype: Any, *, large: bool = False) -> Case:
    features, kwargs, _ = CONFIGS[config]
    g = torch.Generator().manual_seed(seed)
    hkv = 2 if "gqa" in features else HQ
    ev = EV if "value_dim" in features else E
    if large:  # integer q and k: exact logits of magnitude ~1e3 (exp overflows without the max)
        q = torch.randint(-40, 41, (B, HQ, length, E), generator=g).to(dtype)
        k = torch.randint(-40, 41, (B, hkv, keys, E), generator=g).to(dtype)
    else:
        q = torch.randn(B, HQ, length, E, generator=g, dtype=torch.float64).to(dtype)
        k = torch.randn(B, hkv, keys, E, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, hkv, keys, ev, generator=g, dtype=torch.float64).to(dtype)
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
    if "dropout" in features:  # (Hq, L, S): broadcast over the batch
        kwargs["dropout_mask"] = torch.from_numpy(ar.dropout_mask((HQ, length, keys), DROPOUT_P, seed))
    kwargs["return_weights"] = "weights" in features
    kwargs["return_lse"] = "lse" in features
    spec: dict[str, Any] = {}
    if "mask_mod" in kwargs:  # causal_mask(0) is causal=True, top-left
        spec["causal"] = True
    if config == "score_mod_softcap":  # 2 * score is the scale 2 / sqrt(E)
        spec["scale"] = 2 / math.sqrt(E)
    elif "score_mod" in kwargs:  # alibi(slopes) is the bias -slopes[h] |i - j|
        distance = np.abs(np.arange(length)[:, None] - np.arange(keys)[None, :])
        compute = np.float64 if dtype == torch.float64 else np.float32
        spec["bias"] = (-ar.flex.alibi_slopes(HQ)[:, None, None] * distance).astype(compute)
    name = f"{config}-L{length}-S{keys}-{str(dtype).removeprefix('torch.')}{'-large' if large else ''}"
    return Case(name, features, q, k, v, kwargs, spec)


def _build_cases() -> list[Case]:
    cases = [_make_case(seed, config, length, keys, dtype)
             for seed, (config, (length, keys), dtype) in enumerate(
                 (c, s, d) for c, (_, _, sizes) in CONFIGS.items() for s in sizes
                 for d in (torch.float32, torch.float64))]
    for length, keys in ((5, 70), (70, 130)):
        for dtype in (torch.float32, torch.float64):  # large logits: overflow and underflow
            cases += [_make_case(len(cases), config, length, keys, dtype, large=True) for config in ("plain", "mask")]
        for dtype in (torch.float16, torch.bfloat16):  # half precision inputs, float32 compute
            cases += [_make_case(len(cases), config, length, keys, dtype)
                      for config in ("plain", "gqa_lse_weights", "all_bottom_right", "everything")]
    return cases


CASES = _build_cases()


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """Small tensors: one intra-op thread is fastest, and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _spec(index: int) -> tuple[AttentionCase, AttentionOutput, Any]:
    """The case as an AttentionCase, its float64 oracle and the tolerance rule's bounds."""
    case = CASES[index]
    backend = ar.get_backend("torch")
    arrays = {name: backend.to_numpy(case.kwargs[name]) for name in ("mask", "bias", "dropout_mask")
              if name in case.kwargs}
    options = {name: case.kwargs[name] for name in ("scale", "causal", "alignment", "softcap", "window", "dropout_p")
               if name in case.kwargs}
    spec_case = AttentionCase(*(backend.to_numpy(x) for x in (case.q, case.k, case.v)),
                              **{**arrays, **options, **case.spec})
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


def _check_gradients(index: int, kernel: Any) -> None:
    """Raise AssertionError unless the kernel's autograd gradients of case ``index`` (a ``grad`` case)
    match the oracle's for a random cotangent."""
    case = CASES[index]
    spec_case, oracle, _ = _spec(index)
    d_out = torch.from_numpy(np.random.default_rng(index).standard_normal(oracle.out.shape)).to(case.q.dtype)
    inputs = [x.detach().clone().requires_grad_() for x in (case.q, case.k, case.v)]
    kwargs = {**case.kwargs, "return_weights": False, "return_lse": False}
    with_dbias = "dbias" in case.features and "bias" in kwargs
    if with_dbias:
        kwargs["bias"] = kwargs["bias"].detach().clone().requires_grad_()
        inputs.append(kwargs["bias"])
    grads = torch.autograd.grad(kernel(*inputs[:3], **kwargs), inputs, d_out, allow_unused=True)
    backend = ar.get_backend("torch")
    dq, dk, dv, *dbias = (backend.to_numpy(torch.zeros_like(x) if g is None else g)
                          for x, g in zip(inputs, grads, strict=True))
    assert_gradients_close(Gradients(dq, dk, dv, dbias[0] if dbias else None), spec_case, backend.to_numpy(d_out),
                           calibrated=False, with_dbias=with_dbias)


def _check_case(kernel: Any, index: int) -> None:
    case = CASES[index]
    _check(index, kernel(case.q, case.k, case.v, **case.kwargs))
    if "grad" in case.features:
        _check_gradients(index, kernel)


def _within(supports: tuple[str, ...]) -> list[int]:
    return [index for index, case in enumerate(CASES) if case.features <= set(supports)]


def test_cases_cover_the_features() -> None:
    assert len(BUGS) >= 46
    for bug in BUGS:
        assert callable(bug.kernel) and bug.description, bug.name
        assert set(bug.supports) <= set(KERNEL_FEATURES), bug.name
    assert set().union(*(case.features for case in CASES)) == set(KERNEL_FEATURES)
    # every case, fully excluded rows included, is one the oracle answers without NaN
    for index in range(len(CASES)):
        _, expected, _ = _spec(index)
        assert not any(np.isnan(x).any() for x in expected), CASES[index].name


@pytest.mark.parametrize("name", list(CORRECT_KERNELS))
def test_correct_kernel_matches_the_oracle(name: str) -> None:
    kernel = CORRECT_KERNELS[name]
    failures = []
    eligible = _within(kernel.supports)
    for index in eligible:
        try:
            _check_case(kernel.kernel, index)
        except AssertionError as error:
            failures.append(f"{CASES[index].name}: {str(error).splitlines()[0]}")
    assert not failures, f"{len(failures)} of {len(eligible)} cases fail:\n" + "\n".join(failures[:20])


@pytest.mark.parametrize("name", list(BUGS_BY_NAME))
def test_bug_is_observable(name: str) -> None:
    bug = BUGS_BY_NAME[name]
    eligible = _within(bug.supports)
    for index in eligible:
        try:
            _check_case(bug.kernel, index)
        except AssertionError:
            return
    pytest.fail(f"{name}: the bug is not observable on any of the {len(eligible)} fixed cases in its supports")
