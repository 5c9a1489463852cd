"""The varlen crosscheck targets (attention_ref/testing/varlen_targets.py): jax.nn's dot_product_attention
with sequence lengths and torch SDPA on jagged nested tensors, each through ``check(...,
interface="varlen")`` with its declarations, and their findings: jax.nn agrees segment by segment except
on fully excluded rows (its finite mask fill), and torch's jagged SDPA refuses a batch whose segments
are all empty."""

from __future__ import annotations

import numpy as np
import pytest

import attention_ref as ar
from attention_ref.testing.adapters import available_targets, find_target
from attention_ref.testing.report import Status
from attention_ref.testing.varlen_targets import JAX_VARLEN, TORCH_NESTED

from .conftest import import_or_skip


def _statuses(name: str, properties: tuple[str, ...]) -> tuple[dict[str, Status], dict[str, str]]:
    target = next(t for t in available_targets("cpu") if t.name == name)
    assert target.interface == "varlen"
    assert find_target(name, "cpu", target.builder).name == name
    report = target.run(dtypes=("float32",), max_examples=5, seed=0, properties=properties)
    return ({o.name: o.status for o in report.outcomes}, {o.name: o.detail or "" for o in report.outcomes})


def _problem(rng: np.random.Generator, cu_q: list[int], cu_k: list[int], hq: int, hkv: int, extra_q: int = 0):  # type: ignore[no-untyped-def]
    q = rng.standard_normal((cu_q[-1] + extra_q, hq, 4)).astype(np.float32)
    k, v = (rng.standard_normal((cu_k[-1], hkv, 4)).astype(np.float32) for _ in range(2))
    return q, k, v, np.array(cu_q), np.array(cu_k)


def test_jax_seq_lengths_agrees_per_segment_but_not_on_rows_with_no_keys() -> None:
    import_or_skip("jax")
    statuses, details = _statuses(JAX_VARLEN, ("segments_are_independent", "varlen_equals_each_segments_attention",
                                               "default_scale_is_inverse_sqrt_head_dim"))
    assert statuses["segments_are_independent"] == Status.PASS
    assert statuses["default_scale_is_inverse_sqrt_head_dim"] == Status.PASS
    assert statuses["varlen_equals_each_segments_attention"] == Status.FAIL
    assert "lse" in details["varlen_equals_each_segments_attention"]
    assert "expected np.float64(-inf)" in details["varlen_equals_each_segments_attention"]


def test_jax_seq_lengths_fully_excluded_rows_get_the_mask_fill() -> None:
    """Non-empty rows agree with ar.varlen_attention; a segment with no keys has lse the finite fill
    (SPEC.md: -inf) and out the mean of the zero padding; a row the window excludes averages v over its
    padded row (padding included), so neither SPEC.md's 0 nor the segment's mean(v)."""
    jnp = import_or_skip("jax.numpy")
    from attention_ref.testing.varlen_targets import jax_seq_lengths

    q, k, v, cu_q, cu_k = _problem(np.random.default_rng(0), [0, 4, 7, 9], [0, 2, 6, 6], hq=2, hkv=1, extra_q=1)
    out, lse = (np.asarray(x, np.float64) for x in jax_seq_lengths(
        *(jnp.asarray(x) for x in (q, k, v)), jnp.asarray(cu_q, jnp.int32), jnp.asarray(cu_k, jnp.int32),
        max_seqlen_q=4, max_seqlen_k=4, window=(0, 0), return_lse=True))
    ref = ar.varlen_attention(*(x.astype(np.float64) for x in (q, k, v)), cu_q, cu_k, window=(0, 0), return_lse=True)
    attended = np.isfinite(ref.lse[0])
    assert attended.tolist() == [True, True, False, False, True, True, True, False, False, False]
    np.testing.assert_allclose(out[attended], ref.out[attended], atol=1e-5)
    np.testing.assert_allclose(lse[:, attended], ref.lse[:, attended], atol=1e-5)
    assert np.all(out[9] == 0) and np.all(lse[:, 9] == -np.inf)  # the token in no segment: written by the adapter
    assert np.all(np.isfinite(lse[:, 2:4])) and np.all(lse[:, 2:4] < -1e38)  # window-excluded rows: the fill
    assert np.all(np.isfinite(lse[:, 7:9])) and np.all(out[7:9] == 0)  # the segment with no keys
    padded_mean = v[0:2].astype(np.float64).sum(axis=0) / 4  # two keys and two zero pads
    np.testing.assert_allclose(out[2], np.repeat(padded_mean, 2, axis=0), atol=1e-6)


def test_torch_nested_sdpa_refuses_all_empty_segments() -> None:
    import_or_skip("torch")
    statuses, details = _statuses(TORCH_NESTED, ("matches_float64_oracle", "varlen_equals_each_segments_attention"))
    assert statuses["varlen_equals_each_segments_attention"] == Status.NOT_APPLICABLE  # no lse
    assert statuses["matches_float64_oracle"] == Status.ERROR
    detail = details["matches_float64_oracle"]
    assert "No viable backend" in detail or "at least one constituent tensor should have non-zero numel" in detail


def test_torch_nested_sdpa_agrees_with_empty_segments_among_others() -> None:
    torch = import_or_skip("torch")
    from attention_ref.testing.varlen_targets import torch_nested_sdpa

    q, k, v, cu_q, cu_k = _problem(np.random.default_rng(1), [0, 3, 3, 5], [0, 2, 6, 6], hq=2, hkv=2, extra_q=1)
    out = torch_nested_sdpa(*(torch.from_numpy(x) for x in (q, k, v)), torch.from_numpy(cu_q).int(),
                            torch.from_numpy(cu_k).int(), max_seqlen_q=3, max_seqlen_k=4).numpy()
    ref = ar.varlen_attention(*(x.astype(np.float64) for x in (q, k, v)), cu_q, cu_k)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=1e-5)  # the segment with no keys and the extra token: 0
    with pytest.raises(RuntimeError):
        torch_nested_sdpa(*(torch.from_numpy(x) for x in (q[:0], k, v)), torch.tensor([0, 0, 0], dtype=torch.int32),
                          torch.tensor([0, 2, 6], dtype=torch.int32), max_seqlen_q=0, max_seqlen_k=4)
