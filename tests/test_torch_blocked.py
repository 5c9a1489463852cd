"""The torch backend's blocked algorithm (SPEC.md rule 19, ``attention_ref/backends/torch_blocked.py``):
results and gradients against the float64 oracle within the tolerance of rule 19 (``key_block=``),
blocked against dense within twice that bound, autograd through ``attention`` against
``attention_vjp``, ``torch.autograd.gradcheck`` in float64, and no graph without ``requires_grad``."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from attention_ref.testing.assertions import assert_attention_close, assert_gradients_close, assert_within
from attention_ref.testing.cases import AttentionCase, call, call_vjp, random_cotangent

from .blocked_cases import (
    BLOCKED_CASES,
    assert_blocked_gradients_match_oracle_and_dense,
    assert_blocked_matches_oracle_and_dense,
    half_precision_case,
)
from .blocked_cases import tile as _blocks
from .conftest import import_or_skip

torch = import_or_skip("torch")

import attention_ref as ar  # noqa: E402
from attention_ref.backends import torch_blocked  # noqa: E402

BACKEND = ar.get_backend("torch")
CASES = BLOCKED_CASES
HALF = ["float16", "bfloat16"]


@pytest.fixture(params=[torch_blocked.TILE_BYTES, 1], ids=["tile", "one-head-chunks"])
def tile_bytes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """The module's tile size, and 1 byte: every chunk one query head (the items then share dk, dv
    and, for a bias broadcast over heads or queries, dbias across chunks)."""
    monkeypatch.setattr(torch_blocked, "TILE_BYTES", request.param)
    return int(request.param)


@pytest.mark.parametrize("name", list(CASES))
def test_blocked_matches_the_oracle_and_the_dense_path(name: str, tile_bytes: int) -> None:
    assert_blocked_matches_oracle_and_dense(BACKEND, *CASES[name])


@pytest.mark.parametrize("name", list(CASES))
def test_blocked_gradients_match_the_oracle_and_the_dense_path(name: str, tile_bytes: int) -> None:
    assert_blocked_gradients_match_oracle_and_dense(BACKEND, *CASES[name])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_excluded_keys_change_nothing(dtype: str, tile_bytes: int) -> None:
    """k and v of keys every query excludes (mask, a -inf bias column) change no result, bit for bit:
    their weights are exactly 0, never a flushed tiny value (rule 8)."""
    case, (block_q, block_k) = CASES["excluded rows, -inf bias"]
    case = case.replace(q=case.q.astype(dtype), k=case.k.astype(dtype), v=case.v.astype(dtype),
                        bias=case.bias.astype(dtype))
    bias = case.bias.copy()
    bias[:, 11] = -np.inf  # key 11 excluded by its bias, key 3 by the mask
    case = case.replace(bias=bias)
    k, v = case.k.copy(), case.v.copy()
    k[..., [3, 11], :] = 1e3
    v[..., [3, 11], :] = 1e30
    changed = case.replace(k=k, v=v)
    d_out = random_cotangent(case, 4)
    first = call(BACKEND, case, return_lse=True, **_blocks(block_q, block_k))
    second = call(BACKEND, changed, return_lse=True, **_blocks(block_q, block_k))
    np.testing.assert_array_equal(first.out, second.out)
    np.testing.assert_array_equal(first.lse, second.lse)
    grads, changed_grads = (call_vjp(BACKEND, c, d_out, **_blocks(block_q, block_k)) for c in (case, changed))
    np.testing.assert_array_equal(grads.dq, changed_grads.dq)
    np.testing.assert_array_equal(grads.dbias, changed_grads.dbias)
    for g in (grads, changed_grads):
        assert not g.dk[..., [3, 11], :].any() and not g.dv[..., [3, 11], :].any()


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_inputs_compute_in_float32(dtype: str) -> None:
    case = half_precision_case(dtype)
    blocked = call(BACKEND, case, return_lse=True, **_blocks(4, 4))
    assert blocked.out.dtype == case.q.dtype and blocked.lse.dtype == np.float32
    assert_attention_close(blocked, case, calibrated=False, key_block=4)
    d_out = random_cotangent(case, 3)
    grads = call_vjp(BACKEND, case, d_out, **_blocks(4, 4))
    assert grads.dq.dtype == case.q.dtype and grads.dbias.dtype == case.q.dtype
    assert_gradients_close(grads, case, d_out, calibrated=False, key_block=4)


@pytest.mark.parametrize(("q_len", "kv_len"), [(0, 5), (4, 0), (0, 0)])
def test_empty_sequences(q_len: int, kv_len: int) -> None:
    """L = 0: empty results; S = 0: out zeros, lse -inf, zero gradients; through autograd too."""
    q, k, v = (torch.randn(2, 3, n, 4, dtype=torch.float64, requires_grad=True) for n in (q_len, kv_len, kv_len))
    result = ar.attention(q, k, v, return_lse=True, block_q=2, block_k=2)
    assert result.out.shape == (2, 3, q_len, 4) and result.lse.shape == (2, 3, q_len)
    assert torch.equal(result.out, torch.zeros_like(result.out))
    assert torch.equal(result.lse, torch.full_like(result.lse, -torch.inf))
    result.out.sum().backward()
    grads = ar.attention_vjp(q, k, v, torch.ones(2, 3, q_len, 4, dtype=torch.float64), block_q=2, block_k=2)
    for tracked, grad in zip((q, k, v), grads[:3], strict=True):
        assert tracked.grad is not None and grad.shape == tracked.shape
        assert torch.equal(tracked.grad, torch.zeros_like(tracked)) and torch.equal(grad, torch.zeros_like(grad))


def _torch_arrays(case: AttentionCase, *, grad: bool) -> dict[str, Any]:
    arrays: dict[str, Any] = {
        name: None if x is None else BACKEND.asarray(x)
        for name, x in (("q", case.q), ("k", case.k), ("v", case.v), *case.array_keywords().items())
    }
    for name in ("q", "k", "v", "bias"):
        if grad and arrays.get(name) is not None:
            arrays[name].requires_grad_()
    return arrays


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dense", [False, True], ids=["blocked", "dense"])
def test_autograd_through_attention_equals_attention_vjp(name: str, dense: bool, tile_bytes: int) -> None:
    """``out.backward(d_out)`` gives attention_vjp's dq, dk, dv and dbias: the same computation
    (the blocked path's BlockedAttention runs the backward attention_vjp runs), so bit for bit."""
    case, (block_q, block_k) = CASES[name]
    algorithm: dict[str, Any] = {"dense": True} if dense else _blocks(block_q, block_k)
    arrays = _torch_arrays(case, grad=True)
    q, k, v = arrays.pop("q"), arrays.pop("k"), arrays.pop("v")
    out = ar.attention(q, k, v, **arrays, **case.scalar_keywords(), **algorithm)
    d_out = BACKEND.asarray(random_cotangent(case, 5))
    out.backward(d_out)
    expected = ar.attention_vjp(q, k, v, d_out, **arrays, **case.scalar_keywords(), **algorithm)
    for field, tracked in zip(("dq", "dk", "dv", "dbias"), (q, k, v, arrays["bias"]), strict=True):
        want = getattr(expected, field)
        if tracked is None:
            assert want is None
            continue
        assert tracked.grad is not None, field
        assert tracked.grad.dtype == tracked.dtype and tracked.grad.shape == tracked.shape
        assert torch.equal(tracked.grad, want), f"{field}: autograd {tracked.grad} vs attention_vjp {want}"


def test_autograd_through_lse() -> None:
    """A cotangent of lse (``d lse / d x = P``) reaches q, k, v and bias as the dense path's does."""
    case, _ = CASES["softcap and bias"]
    seed = torch.Generator().manual_seed(0)
    results = []
    for algorithm in (_blocks(4, 3), {"dense": True}):
        arrays = _torch_arrays(case.replace(q=case.q.astype(np.float64), k=case.k.astype(np.float64),
                                            v=case.v.astype(np.float64), bias=case.bias.astype(np.float64)),
                               grad=True)
        q, k, v = arrays.pop("q"), arrays.pop("k"), arrays.pop("v")
        result = ar.attention(q, k, v, **arrays, **case.scalar_keywords(), return_lse=True, **algorithm)
        seed.manual_seed(0)
        d_lse = torch.randn(result.lse.shape, dtype=torch.float64, generator=seed)
        d_out = torch.randn(result.out.shape, dtype=torch.float64, generator=seed)
        torch.autograd.backward([result.lse, result.out], [d_lse, d_out])
        results.append([x.grad for x in (q, k, v, arrays["bias"])])
    for blocked, dense in zip(*results, strict=True):
        torch.testing.assert_close(blocked, dense, rtol=1e-12, atol=1e-12)  # float64: ~1e-15 apart


def _gradcheck_cases() -> dict[str, tuple[dict[str, Any], tuple[int, int], bool]]:
    """Float64 calls of several tiles for gradcheck: (options, tile, whether lse is differentiated)."""
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(1, 7, 9, generator=gen) > 0.3
    mask[0, 2] = False  # a fully excluded row
    keep = torch.rand(4, 7, 9, generator=gen) > 0.3
    return {
        "bias, mask, GQA": ({"bias": torch.randn(4, 1, 9, dtype=torch.float64, generator=gen), "mask": mask},
                            (3, 4), False),
        "causal, softcap, dropout": ({"causal": True, "softcap": 1.3, "dropout_p": 0.3, "dropout_mask": keep,
                                      "bias": torch.randn(7, 9, dtype=torch.float64, generator=gen)}, (2, 3), False),
        "window, bottom_right, lse": ({"window": (3, 1), "alignment": "bottom_right", "scale": 0.7,
                                       "bias": torch.randn(1, 4, 7, 9, dtype=torch.float64, generator=gen)},
                                      (4, 2), True),
    }


@pytest.mark.parametrize("name", list(_gradcheck_cases()))
def test_gradcheck_float64(name: str, tile_bytes: int) -> None:
    options, (block_q, block_k), with_lse = _gradcheck_cases()[name]
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 7, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.randn(1, 2, 9, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    v = torch.randn(1, 2, 9, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = options.pop("bias").requires_grad_()

    def fn(q: Any, k: Any, v: Any, bias: Any) -> Any:
        result = ar.attention(q, k, v, bias=bias, **options, block_q=block_q, block_k=block_k, return_lse=with_lse)
        return (result.out, result.lse) if with_lse else result

    assert torch.autograd.gradcheck(fn, (q, k, v, bias))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts_agree_and_are_restored(threads: int) -> None:
    """The forward is computed item by item the same way on any number of threads (bit for bit); the
    gradients agree within float64 rounding; the caller's thread count is unchanged afterwards."""
    case, (block_q, block_k) = CASES["float64"]
    d_out = random_cotangent(case, 1)
    before = torch.get_num_threads()
    results = []
    for count in (1, threads):
        torch.set_num_threads(count)
        try:
            results.append((call(BACKEND, case, return_lse=True, **_blocks(block_q, block_k)),
                            call_vjp(BACKEND, case, d_out, **_blocks(block_q, block_k))))
        finally:
            torch.set_num_threads(before)
        assert torch.get_num_threads() == before
    (first, first_grads), (second, second_grads) = results
    np.testing.assert_array_equal(first.out, second.out)
    np.testing.assert_array_equal(first.lse, second.lse)
    bounds = case.gradient_bounds(d_out, case.oracle_gradients(d_out), key_block=block_k) * 2
    for field in ("dq", "dk", "dv", "dbias"):
        assert_within(field, getattr(second_grads, field), getattr(first_grads, field), getattr(bounds, field), case)


def test_no_graph_without_requires_grad() -> None:
    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    bias = torch.randn(6, 6)
    result = ar.attention(q, k, v, bias=bias, return_lse=True, block_q=2, block_k=3)
    assert result.out.grad_fn is None and not result.out.requires_grad and result.lse.grad_fn is None
    q.requires_grad_()
    with torch.no_grad():
        out = ar.attention(q, k, v, bias=bias, block_q=2, block_k=3)
    assert out.grad_fn is None and not out.requires_grad
    out = ar.attention(q, k, v, bias=bias, block_q=2, block_k=3)
    assert isinstance(out.grad_fn, torch_blocked.BlockedAttention._backward_cls)  # type: ignore[attr-defined]


def test_only_the_bias_requires_grad() -> None:
    """Gradients reach a bias that alone requires grad; q, k, v get none."""
    q, k, v = (torch.randn(2, 5, 3, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)
    d_out = torch.randn(2, 5, 3, dtype=torch.float64)
    ar.attention(q, k, v, bias=bias, causal=True, block_q=2, block_k=2).backward(d_out)
    expected = ar.attention_vjp(q, k, v, d_out, bias=bias, causal=True, block_q=2, block_k=2)
    assert q.grad is None and torch.equal(bias.grad, expected.dbias)


def test_autograd_saves_no_weights() -> None:
    """What BlockedAttention saves for the backward: nothing of the logits' size (L * S per head)."""
    q_len, kv_len = 64, 96
    q = torch.randn(1, 2, q_len, 4, requires_grad=True)
    k, v = torch.randn(1, 2, kv_len, 4), torch.randn(1, 2, kv_len, 4)
    saved: list[torch.Size] = []

    def pack(x: torch.Tensor) -> torch.Tensor:
        saved.append(x.shape)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = ar.attention(q, k, v, mask=torch.ones(q_len, 1, dtype=torch.bool), block_q=16, block_k=32)
    out.sum().backward()
    assert saved and all(np.prod(shape) < q_len * kv_len for shape in saved), saved


def test_runs_on_a_device_without_host_synchronisation() -> None:
    """On the meta device (shapes without data) forward, autograd and attention_vjp run through: no
    ``.item()``, ``.cpu()`` or data-dependent branch, which a meta tensor cannot answer; what a CUDA
    call needs of the code besides its arithmetic. Results keep the device, shapes and dtypes."""
    meta = torch.device("meta")
    q, k, v = torch.empty(2, 4, 9, 5, device=meta), torch.empty(2, 2, 11, 5, device=meta), torch.empty(2, 2, 11, 3,
                                                                                                        device=meta)
    bias = torch.empty(4, 1, 11, device=meta, requires_grad=True)
    options: dict[str, Any] = {"bias": bias, "causal": True, "softcap": 2.0, "dropout_p": 0.5, "block_q": 4,
                               "block_k": 3, "dropout_mask": torch.empty(9, 11, dtype=torch.bool, device=meta),
                               "mask": torch.empty(2, 1, 1, 11, dtype=torch.bool, device=meta)}
    result = ar.attention(q, k, v, **options, return_lse=True)
    assert result.out.device == meta and result.out.shape == (2, 4, 9, 3) and result.lse.shape == (2, 4, 9)
    result.out.backward(torch.empty(2, 4, 9, 3, device=meta))
    assert bias.grad is not None and bias.grad.shape == bias.shape
    grads = ar.attention_vjp(q, k, v, torch.empty(2, 4, 9, 3, device=meta), **options)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape, bias.shape]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_the_oracle() -> None:
    """On CUDA: results stay on the device, within rule 19's bounds (TF32 off for the call)."""
    case, (block_q, block_k) = CASES["excluded rows, -inf bias"]
    arrays = {name: None if x is None else torch.from_numpy(np.array(x)).cuda()
              for name, x in (("q", case.q), ("k", case.k), ("v", case.v), *case.array_keywords().items())}
    q, k, v = arrays.pop("q"), arrays.pop("k"), arrays.pop("v")
    result = ar.attention(q, k, v, **arrays, **case.scalar_keywords(), return_lse=True, block_q=block_q,
                          block_k=block_k)
    assert result.out.device == q.device
    assert_attention_close(ar.AttentionOutput(result.out.cpu().numpy(), None, result.lse.cpu().numpy()), case,
                           calibrated=False, key_block=block_k)
    d_out = random_cotangent(case, 2)
    grads = ar.attention_vjp(q, k, v, torch.from_numpy(d_out).cuda(), **arrays, **case.scalar_keywords(),
                             block_q=block_q, block_k=block_k)
    assert_gradients_close(ar.Gradients(*(None if g is None else g.cpu().numpy() for g in grads)), case, d_out,
                           calibrated=False, key_block=block_k)
