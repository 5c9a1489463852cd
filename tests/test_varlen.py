"""Packed variable-length attention (SPEC.md rule 20) and the helpers of ``attention_ref.varlen``:
each segment is its own attention, causal and windows aligned within it, on every backend."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import attention_ref as ar
from attention_ref import varlen
from attention_ref.testing import AttentionCase, assert_attention_close, assert_gradients_close

from .conftest import BACKENDS, backend_on_device

#: Segmentations with empty segments on either side, a one-token segment, and tokens in no segment.
CU_Q = np.array([0, 0, 3, 4, 4, 9])
CU_K = np.array([0, 2, 2, 7, 7, 12])
TOTAL_Q, TOTAL_K = 11, 14  # two query and two key tokens beyond the last segment


def _packed(seed: int = 0, dtype: str = "float32", heads: tuple[int, int] = (4, 2)) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    hq, hkv = heads
    return (rng.standard_normal((TOTAL_Q, hq, 5)).astype(dtype), rng.standard_normal((TOTAL_K, hkv, 5)).astype(dtype),
            rng.standard_normal((TOTAL_K, hkv, 3)).astype(dtype))


def _segment_case(q: np.ndarray, k: np.ndarray, v: np.ndarray, b: int, **options: Any) -> AttentionCase:
    """Segment b as an ordinary attention case: its tokens, heads first."""
    qs, ks = slice(CU_Q[b], CU_Q[b + 1]), slice(CU_K[b], CU_K[b + 1])
    return AttentionCase(q=q[qs].swapaxes(0, 1), k=k[ks].swapaxes(0, 1), v=v[ks].swapaxes(0, 1), **options)


OPTIONS = [dict(), dict(causal=True), dict(causal=True, alignment="bottom_right"),
           dict(window=(1, 0), alignment="bottom_right"), dict(window=(0, 2), softcap=2.0, scale=0.7)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_each_segment_is_its_own_attention(backend: str, options: dict[str, Any]) -> None:
    impl = backend_on_device(backend)
    q, k, v = _packed()
    result = ar.varlen_attention(*map(impl.asarray, (q, k, v)), CU_Q, CU_K, backend=impl, return_lse=True,
                                 **options)
    out, lse = impl.to_numpy(result.out), impl.to_numpy(result.lse)
    assert out.shape == (TOTAL_Q, 4, 3) and out.dtype == np.float32 and lse.shape == (4, TOTAL_Q)
    for b in range(CU_Q.size - 1):
        if CU_Q[b + 1] == CU_Q[b]:
            continue
        rows = slice(CU_Q[b], CU_Q[b + 1])
        case = _segment_case(q, k, v, b, **options)
        assert_attention_close(ar.AttentionOutput(out[rows].swapaxes(0, 1), None, lse[:, rows]), case,
                               calibrated=False)
    outside = slice(CU_Q[-1], TOTAL_Q)
    assert np.all(out[outside] == 0) and np.all(lse[:, outside] == -np.inf)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_are_the_segments_gradients(backend: str) -> None:
    impl = backend_on_device(backend)
    q, k, v = _packed(dtype="float64")
    d_out = np.random.default_rng(1).standard_normal((TOTAL_Q, 4, 3))
    options = dict(causal=True, alignment="bottom_right")
    grads = ar.varlen_attention_vjp(*map(impl.asarray, (q, k, v)), CU_Q, CU_K, impl.asarray(d_out), backend=impl,
                                    **options)
    dq, dk, dv = (impl.to_numpy(x) for x in grads[:3])
    assert grads.dbias is None and dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    for b in range(CU_Q.size - 1):
        rows, keys = slice(CU_Q[b], CU_Q[b + 1]), slice(CU_K[b], CU_K[b + 1])
        if rows.stop == rows.start or keys.stop == keys.start:
            assert np.all(dq[rows] == 0) and np.all(dk[keys] == 0) and np.all(dv[keys] == 0)
            continue
        case = _segment_case(q, k, v, b, **options)
        segment = ar.Gradients(dq[rows].swapaxes(0, 1), dk[keys].swapaxes(0, 1), dv[keys].swapaxes(0, 1), None)
        assert_gradients_close(segment, case, d_out[rows].swapaxes(0, 1), calibrated=False)
    assert np.all(dq[CU_Q[-1]:] == 0) and np.all(dk[CU_K[-1]:] == 0) and np.all(dv[CU_K[-1]:] == 0)


def test_seqused_k_keeps_the_first_keys_and_aligns_causal_to_them() -> None:
    q, k, v = _packed(dtype="float64")
    used = np.diff(CU_K) - np.array([0, 0, 2, 0, 1])
    out = ar.varlen_attention(q, k, v, CU_Q, CU_K, backend="numpy", seqused_k=used, causal=True,
                              alignment="bottom_right")
    for b in (1, 2, 4):
        rows = slice(CU_Q[b], CU_Q[b + 1])
        keys = slice(CU_K[b], CU_K[b] + used[b])
        expected = ar.attention(q[rows].swapaxes(0, 1), k[keys].swapaxes(0, 1), v[keys].swapaxes(0, 1),
                                backend="numpy", causal=True, alignment="bottom_right")
        np.testing.assert_allclose(out[rows].swapaxes(0, 1), expected, rtol=0, atol=1e-13)


def test_varlen_mask_is_block_diagonal_with_per_segment_alignment() -> None:
    mask = varlen.varlen_mask(CU_Q, CU_K, total_q=TOTAL_Q, total_k=TOTAL_K, causal=True, alignment="bottom_right")
    expected = np.zeros((TOTAL_Q, TOTAL_K), bool)
    for b in range(CU_Q.size - 1):
        for i in range(CU_Q[b], CU_Q[b + 1]):
            for j in range(CU_K[b], CU_K[b + 1]):  # bottom-right: the last query sees the last key
                expected[i, j] = (j - CU_K[b]) <= (i - CU_Q[b]) + (CU_K[b + 1] - CU_K[b]) - (CU_Q[b + 1] - CU_Q[b])
    assert np.array_equal(mask, expected)
    assert not mask[CU_Q[-1]:].any() and not mask[:, CU_K[-1]:].any()


def test_pack_and_unpack_round_trip_on_either_side() -> None:
    rng = np.random.default_rng(0)
    lengths = np.array([3, 0, 5, 1])
    padded = rng.standard_normal((4, 5, 2))
    for side in ("right", "left"):
        packed, cu = varlen.pack(padded, lengths, padding_side=side)
        assert packed.shape == (9, 2) and list(cu) == [0, 3, 3, 8, 9]
        back = varlen.unpack(packed, cu, length=5, padding_side=side)
        for b, n in enumerate(lengths):
            real = slice(0, n) if side == "right" else slice(5 - n, 5)
            assert np.array_equal(back[b, real], padded[b, real])
            assert np.count_nonzero(back[b]) == 2 * n
    ids = varlen.cu_seqlens_to_segment_ids(cu, total=11)
    assert list(ids) == [0, 0, 0, 2, 2, 2, 2, 2, 3, -1, -1]
    assert list(varlen.segment_ids_to_cu_seqlens(ids)) == [0, 3, 3, 8, 9]


@pytest.mark.parametrize(("cu_q", "cu_k", "seqused_k", "message"), [
    ([1, 3], [0, 3], None, r"cu_seqlens_q\[0\] must be 0, got 1"),
    ([0, 4, 2], [0, 2, 4], None, "cu_seqlens_q must be nondecreasing: segment 1 ends at 2 before it starts at 4"),
    ([0, 3], [0, 3, 5], None, "must have the same length"),
    ([0, 12], [0, 3], None, r"cu_seqlens_q\[-1\] = 12 is beyond the 11 packed tokens"),
    ([0.0, 3.0], [0, 3], None, "cu_seqlens_q must be integers"),
    ([0, 3], [0, 3], [4], r"seqused_k\[0\] = 4 is outside \[0, 3\], the keys of segment 0"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_segmentations_are_the_same_error_everywhere(backend: str, cu_q: Any, cu_k: Any, seqused_k: Any,
                                                         message: str) -> None:
    impl = backend_on_device(backend)
    q, k, v = map(impl.asarray, _packed())
    with pytest.raises(ValueError, match=message):
        ar.varlen_attention(q, k, v, np.array(cu_q), np.array(cu_k), backend=impl,
                            seqused_k=None if seqused_k is None else np.array(seqused_k))


def test_bad_shapes_and_alignment() -> None:
    q, k, v = _packed()
    with pytest.raises(ValueError, match=r"q must be \(total, heads, head_dim\)"):
        ar.varlen_attention(q[None], k, v, CU_Q, CU_K, backend="numpy")
    with pytest.raises(ValueError, match="alignment must be 'top_left' or 'bottom_right'"):
        ar.varlen_attention(q, k, v, CU_Q, CU_K, backend="numpy", causal=True, alignment="bottom-right")


def test_traced_cu_seqlens_are_refused_under_jit() -> None:
    jax = pytest.importorskip("jax")
    q, k, v = (jax.numpy.asarray(x) for x in _packed())

    @jax.jit
    def packed(cu_q: Any, cu_k: Any) -> Any:
        return ar.varlen_attention(q, k, v, cu_q, cu_k, backend="jax")

    with pytest.raises(ValueError, match="cu_seqlens_q must be concrete integers"):
        packed(jax.numpy.asarray(CU_Q), jax.numpy.asarray(CU_K))
    direct = jax.jit(lambda q, k, v: ar.varlen_attention(q, k, v, CU_Q, CU_K, backend="jax"))(q, k, v)
    assert direct.shape == (TOTAL_Q, 4, 3)
