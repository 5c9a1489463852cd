"""The CUDA-only targets of attention_ref/testing/cuda_targets.py on a CPU: absent without CUDA, and,
with a fake ``flash_attn`` (the documented signatures, computed by attention_ref in FlashAttention's
conventions) and torch made to report CUDA, built as not verified, their argument plumbing exact and
accepted by the checker. This proves the adapters' conversions, not FlashAttention: the fakes follow
SPEC.md where FlashAttention is documented to differ (+inf lse for rows with no keys)."""

from __future__ import annotations

import importlib.machinery
import sys
import types
from typing import Any

import numpy as np
import pytest

import attention_ref as ar
from attention_ref.testing import cuda_targets
from attention_ref.testing.adapters import Target, available_targets
from attention_ref.testing.check import INTERFACES, CheckReport, check
from attention_ref.testing.crosscheck import CrosscheckReport
from attention_ref.testing.cuda_targets import FLASH_PAGED, FLASH_VARLEN, NOT_VERIFIED, TORCH_VARLEN
from attention_ref.testing.report import Status

from .conftest import import_or_skip

torch = import_or_skip("torch")


def _spec_window(window_size: tuple[int, int]) -> tuple[int | None, int | None] | None:
    """FlashAttention's window_size in SPEC.md's terms (rule 7's table), as the fakes read it."""
    left, right = window_size
    return None if window_size == (-1, -1) else (None if left < 0 else left, None if right < 0 else right)


def _fake_flash_attn(calls: list[dict[str, Any]]) -> types.ModuleType:
    """A ``flash_attn`` module with FlashAttention 2's documented signatures, on torch CPU tensors."""
    module = types.ModuleType("flash_attn")
    module.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)

    def flash_attn_varlen_func(q: Any, k: Any, v: Any, cu_seqlens_q: Any, cu_seqlens_k: Any, max_seqlen_q: int,
                               max_seqlen_k: int, dropout_p: float = 0.0, softmax_scale: float | None = None,
                               causal: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                               alibi_slopes: Any = None, deterministic: bool = False, return_attn_probs: bool = False,
                               block_table: Any = None) -> Any:
        calls.append({"fn": "varlen", "shapes": (tuple(q.shape), tuple(k.shape), tuple(v.shape)),
                      "cu": (cu_seqlens_q.dtype, cu_seqlens_k.dtype), "max": (max_seqlen_q, max_seqlen_k),
                      "dropout_p": dropout_p, "softmax_scale": softmax_scale, "causal": causal,
                      "window_size": window_size, "softcap": softcap, "return_attn_probs": return_attn_probs})
        result = ar.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, scale=softmax_scale, causal=causal,
                                     alignment="bottom_right", softcap=softcap or None,
                                     window=_spec_window(window_size), return_lse=return_attn_probs)
        if not return_attn_probs:
            return result
        lse = torch.where(result.lse == -torch.inf, torch.inf, result.lse)  # FlashAttention 2: +inf on empty rows
        return result.out, lse, None

    def flash_attn_with_kvcache(q: Any, k_cache: Any, v_cache: Any, k: Any = None, v: Any = None,
                                rotary_cos: Any = None, rotary_sin: Any = None, cache_seqlens: Any = None,
                                cache_batch_idx: Any = None, cache_leftpad: Any = None, block_table: Any = None,
                                softmax_scale: float | None = None, causal: bool = False,
                                window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                                rotary_interleaved: bool = True, alibi_slopes: Any = None, num_splits: int = 0,
                                return_softmax_lse: bool = False) -> Any:
        calls.append({"fn": "kvcache", "q": tuple(q.shape), "k": k, "v": v, "tables": (block_table.dtype,
                      cache_seqlens.dtype), "softmax_scale": softmax_scale, "causal": causal,
                      "window_size": window_size, "softcap": softcap, "return_softmax_lse": return_softmax_lse})
        batch, length, heads, width = q.shape  # (B, L, Hq, E); queries are the last L tokens of each cache
        result = ar.paged_attention(q.reshape(batch * length, heads, width), k_cache, v_cache, block_table,
                                    cache_seqlens, cu_seqlens_q=np.arange(batch + 1) * length, scale=softmax_scale,
                                    causal=causal, softcap=softcap or None, window=_spec_window(window_size),
                                    return_lse=True)
        out = result.out.reshape(batch, length, heads, -1)
        lse = result.lse.reshape(heads, batch, length).permute(1, 0, 2)  # (B, Hq, L), FlashAttention's layout
        return (out, lse) if return_softmax_lse else out

    module.flash_attn_varlen_func = flash_attn_varlen_func  # type: ignore[attr-defined]
    module.flash_attn_with_kvcache = flash_attn_with_kvcache  # type: ignore[attr-defined]
    return module


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """A fake flash_attn in sys.modules and torch reporting CUDA; the list of the fake's calls."""
    calls: list[dict[str, Any]] = []
    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash_attn(calls))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return calls


def _packed(rng: np.random.Generator, cu_q: list[int], cu_k: list[int], hq: int = 4, hkv: int = 2,
            e: int = 8) -> tuple[Any, ...]:
    q = torch.from_numpy(rng.standard_normal((cu_q[-1], hq, e)).astype(np.float32))
    k, v = (torch.from_numpy(rng.standard_normal((cu_k[-1], hkv, e)).astype(np.float32)) for _ in range(2))
    return q, k, v, torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32)


def test_no_target_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    assert cuda_targets.cuda_kernel_targets("cpu") == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cuda_targets.cuda_kernel_targets("cuda") == []
    names = {t.name for t in available_targets("cpu")}
    assert not names & {FLASH_VARLEN, TORCH_VARLEN, FLASH_PAGED}


def test_targets_with_a_fake_flash_attn_are_not_verified(fake_cuda: list[dict[str, Any]]) -> None:
    targets = {t.name: t for t in cuda_targets.cuda_kernel_targets("cuda")}
    expected = {FLASH_VARLEN, TORCH_VARLEN} | ({FLASH_PAGED} if "paged" in INTERFACES else set())
    assert set(targets) == expected
    for target in targets.values():
        assert not target.verified and NOT_VERIFIED in target.notes
        assert target.dtypes == ("float16", "bfloat16") and target.device == "cuda"
    assert targets[FLASH_VARLEN].interface == "varlen"
    assert dict(targets[FLASH_VARLEN].conventions) == {"empty_lse": "+inf", "causal_alignment": "bottom_right"}
    assert dict(targets[TORCH_VARLEN].conventions) == {"causal_alignment": "bottom_right"}
    assert any("+inf" in note for note in targets[FLASH_VARLEN].notes)


def test_flash_varlen_passes_the_documented_arguments(fake_cuda: list[dict[str, Any]]) -> None:
    q, k, v, cu_q, cu_k = _packed(np.random.default_rng(0), [0, 3, 3, 7], [0, 5, 6, 10])
    out, lse = cuda_targets.flash_varlen(q, k, v, cu_q, cu_k, max_seqlen_q=4, max_seqlen_k=5, scale=0.5, causal=True,
                                         alignment="bottom_right", window=(2, None), return_lse=True)
    (call,) = fake_cuda
    assert call == {"fn": "varlen", "shapes": ((7, 4, 8), (10, 2, 8), (10, 2, 8)), "cu": (torch.int32, torch.int32),
                    "max": (4, 5), "dropout_p": 0.0, "softmax_scale": 0.5, "causal": True, "window_size": (2, -1),
                    "softcap": 0.0, "return_attn_probs": True}
    ref = ar.varlen_attention(q.double(), k.double(), v.double(), cu_q, cu_k, scale=0.5, causal=True,
                              alignment="bottom_right", window=(2, None), return_lse=True)
    assert out.shape == (7, 4, 8) and lse.shape == (4, 7)
    np.testing.assert_allclose(out.numpy(), ref.out.numpy(), atol=1e-5)
    np.testing.assert_allclose(lse.numpy(), ref.lse.numpy(), atol=1e-5)
    result = cuda_targets.flash_varlen(q, k, v, cu_q, cu_k, max_seqlen_q=4, max_seqlen_k=5, softcap=3.0)
    assert isinstance(result, torch.Tensor) and fake_cuda[-1]["window_size"] == (-1, -1)
    assert fake_cuda[-1]["softcap"] == 3.0 and fake_cuda[-1]["softmax_scale"] is None


def test_flash_varlen_refuses_top_left_only_where_it_differs(fake_cuda: list[dict[str, Any]]) -> None:
    q, k, v, cu_q, cu_k = _packed(np.random.default_rng(1), [0, 3, 3, 7], [0, 5, 6, 10])
    with pytest.raises(ValueError, match="bottom-right only.*segment 0"):
        cuda_targets.flash_varlen(q, k, v, cu_q, cu_k, max_seqlen_q=4, max_seqlen_k=5, causal=True,
                                  alignment="top_left")
    cuda_targets.flash_varlen(q, k, v, cu_q, cu_k, max_seqlen_q=4, max_seqlen_k=5,
                              alignment="top_left")  # no causal, no window: the same
    q, k, v, cu_q, cu_k = _packed(np.random.default_rng(2), [0, 3, 3, 7], [0, 3, 5, 9])  # L_b == S_b where L_b > 0
    out = cuda_targets.flash_varlen(q, k, v, cu_q, cu_k, max_seqlen_q=4, max_seqlen_k=4, causal=True, window=(1, 0),
                                    alignment="top_left")
    ref = ar.varlen_attention(q, k, v, cu_q, cu_k, causal=True, window=(1, 0))  # top_left
    np.testing.assert_allclose(out.numpy(), ref.numpy(), atol=1e-6)


def test_checker_passes_flash_varlen_on_the_fake(fake_cuda: list[dict[str, Any]]) -> None:
    """End to end through the target's own declarations (the fake gives FlashAttention 2's +inf lse on rows
    with no key, and aligns bottom-right): the conversions hold on drawn segmentations, top-left cases
    reach it as equal bottom-right problems, and the +inf lse is verified, reported as convention differs.
    This checks the adapter's plumbing, not FlashAttention (the fake computes with attention_ref)."""
    target = next(t for t in cuda_targets.cuda_kernel_targets("cuda") if t.name == FLASH_VARLEN)
    properties = ("varlen_equals_each_segments_attention", "segments_are_independent", "matches_float64_oracle",
                  "causal_ignores_future_keys")
    report = check(target.kernel, framework="torch", supports=("scale", "gqa", "softcap", "causal", "lse"),
                   interface="varlen", max_examples=10, seed=0, properties=properties, **dict(target.conventions))
    statuses = {o.name: o.status for o in report.outcomes if o.name in properties}
    assert set(statuses.values()) <= {Status.PASS, Status.CONVENTION_DIFFERS}, report.render()
    assert statuses["varlen_equals_each_segments_attention"] == Status.CONVENTION_DIFFERS, report.render()


def test_torch_varlen_passes_its_documented_arguments(fake_cuda: list[dict[str, Any]],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.nn.attention import varlen

    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def varlen_attn(*args: Any, **keywords: Any) -> str:
        calls.append((args, keywords))
        return "out"

    monkeypatch.setattr(varlen, "varlen_attn", varlen_attn)
    q, k, v, cu_q, cu_k = _packed(np.random.default_rng(3), [0, 2, 5], [0, 4, 9])
    assert cuda_targets.torch_varlen(q, k, v, cu_q, cu_k, max_seqlen_q=3, max_seqlen_k=5, scale=0.25, causal=True,
                                     alignment="bottom_right", window=(3, None), return_lse=True) == "out"
    ((args, keywords),) = calls
    assert args[:5] == (q, k, v, cu_q, cu_k) and args[5:] == (3, 5)
    assert keywords == {"return_aux": varlen.AuxRequest(lse=True), "scale": 0.25, "window_size": (3, 0),
                        "enable_gqa": True}
    cuda_targets.torch_varlen(q, k, v, cu_q, cu_k, max_seqlen_q=3, max_seqlen_k=5, causal=True,
                              alignment="bottom_right")
    assert calls[-1][1]["window_size"] == (-1, 0) and calls[-1][1]["return_aux"] is None  # is_causal in torch


def test_flash_paged_decode_and_equal_chunks(fake_cuda: list[dict[str, Any]]) -> None:
    rng = np.random.default_rng(4)
    k_cache, v_cache = (torch.from_numpy(rng.standard_normal((6, 4, 2, 8)).astype(np.float32)) for _ in range(2))
    table, lengths = np.array([[5, 0, -1], [2, 3, 1]]), np.array([3, 10])
    q = torch.from_numpy(rng.standard_normal((2, 4, 8)).astype(np.float32))
    out, lse = cuda_targets.flash_paged(q, k_cache, v_cache, table, lengths, scale=0.3, window=(4, 0),
                                        return_lse=True)
    call = fake_cuda[-1]
    assert call["q"] == (2, 1, 4, 8) and call["k"] is None and call["v"] is None
    assert call["tables"] == (torch.int32, torch.int32) and call["window_size"] == (4, 0)
    ref = ar.paged_attention(q, k_cache, v_cache, table, lengths, scale=0.3, window=(4, 0), return_lse=True)
    assert out.shape == (2, 4, 8) and lse.shape == (4, 2)
    np.testing.assert_allclose(out.numpy(), ref.out.numpy(), atol=1e-6)
    np.testing.assert_allclose(lse.numpy(), ref.lse.numpy(), atol=1e-6)
    q = torch.from_numpy(rng.standard_normal((7, 4, 8)).astype(np.float32))  # two chunks of 3, one token in none
    cu_q = np.array([0, 3, 6])
    out, lse = cuda_targets.flash_paged(q, k_cache, v_cache, table, lengths, cu_seqlens_q=cu_q, max_seqlen_q=3,
                                        causal=True, return_lse=True)
    assert fake_cuda[-1]["q"] == (2, 3, 4, 8)
    ref = ar.paged_attention(q, k_cache, v_cache, table, lengths, cu_seqlens_q=cu_q, causal=True, return_lse=True)
    np.testing.assert_allclose(out.numpy(), ref.out.numpy(), atol=1e-6)
    np.testing.assert_allclose(lse.numpy(), ref.lse.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="one query length per batch"):
        cuda_targets.flash_paged(q, k_cache, v_cache, table, lengths, cu_seqlens_q=np.array([0, 2, 6]))


def test_crosscheck_report_marks_unverified_targets() -> None:
    def kernel(q: Any, k: Any, v: Any) -> Any:
        raise AssertionError("not run")

    target = Target(FLASH_VARLEN, "torch", kernel, ("scale",), verified=False, notes=(NOT_VERIFIED,))
    verified = Target("torch.sdpa[MATH]", "torch", kernel, ("scale",))
    report = CrosscheckReport("cuda", results=[(target, CheckReport(FLASH_VARLEN, dtypes=("float16",)), 1.0),
                                               (verified, CheckReport("torch.sdpa[MATH]", dtypes=("float16",)), 1.0)])
    headers = [line for line in report.render().splitlines() if line.startswith((FLASH_VARLEN, "torch.sdpa[MATH]"))]
    assert len(headers) == 2
    assert "not verified" in headers[0] and "not verified" not in headers[1]
    suites = report.document()["suites"]
    assert "not verified" in suites[0]["description"] and "not verified" not in suites[1]["description"]
