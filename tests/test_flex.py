"""rule 22: score and mask programs on every backend, ``attention_ref.flex``'s programs, and
``flex.materialize`` against torch FlexAttention (eager, on the CPU) itself."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import attention_ref as ar
from attention_ref import flex
from attention_ref.testing import check
from attention_ref.testing.report import Status

from .conftest import import_or_skip

#: Eager flex_attention on the CPU warns that it is unfused: it is the semantics, not the speed, under test.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

RNG = np.random.default_rng(0)
Q, K, V = RNG.standard_normal((2, 4, 13, 8)), RNG.standard_normal((2, 2, 13, 8)), RNG.standard_normal((2, 2, 13, 3))
CU = [0, 3, 3, 8, 11]  # an empty document, and tokens 11 and 12 in none
QI, KJ = np.arange(13)[:, None], np.arange(13)[None, :]

#: Each program of ``attention_ref.flex`` and its pattern, written out here.
MASKS: dict[str, tuple[Any, np.ndarray]] = {
    "causal": (flex.causal_mask(), KJ <= QI),
    "causal_offset": (flex.causal_mask(-2), KJ <= QI - 2),
    "window": (flex.sliding_window_mask(2, 1), (KJ >= QI - 2) & (KJ <= QI + 1)),
    "window_unbounded_left": (flex.sliding_window_mask(None, 0, 1), KJ <= QI + 1),
    "prefix": (flex.prefix_lm_mask(4), (KJ < 4) | (KJ <= QI)),
    "document": (flex.document_mask(CU), ar.varlen.varlen_mask(CU, CU, total_q=13, total_k=13)),
    "document_causal": (flex.and_masks(flex.document_mask(CU), flex.causal_mask()),
                        ar.varlen.varlen_mask(CU, CU, total_q=13, total_k=13, causal=True)),
    "prefix_or_window": (flex.or_masks(flex.prefix_lm_mask(2), flex.sliding_window_mask(1, 0)),
                         (KJ < 2) | (KJ <= QI)),
}


def _framework(name: str) -> tuple[Any, Any]:
    """(to the framework, the x64 scope or a null one) for a backend name."""
    import contextlib

    if name == "torch":
        torch = import_or_skip("torch")
        return torch.as_tensor, contextlib.nullcontext()
    if name == "jax":
        jax = import_or_skip("jax")
        return jax.numpy.asarray, jax.enable_x64(True)
    return np.asarray, contextlib.nullcontext()


@pytest.mark.parametrize("backend", ["numpy", "jax", "torch"])
@pytest.mark.parametrize("name", list(MASKS))
def test_mask_programs_equal_their_patterns(backend: str, name: str) -> None:
    mod, pattern = MASKS[name]
    convert, scope = _framework(backend)
    with scope:
        got = ar.attention(*(convert(x) for x in (Q, K, V)), mask_mod=mod, return_lse=True, backend=backend)
        want = ar.attention(*(convert(x) for x in (Q, K, V)), mask=convert(pattern), return_lse=True,
                            backend=backend)
        np.testing.assert_array_equal(np.asarray(got.out), np.asarray(want.out))  # the same mask, the same path
        np.testing.assert_array_equal(np.asarray(got.lse), np.asarray(want.lse))


@pytest.mark.parametrize("backend", ["numpy", "jax", "torch"])
def test_score_programs_equal_their_biases(backend: str) -> None:
    slopes, table = flex.alibi_slopes(4), RNG.standard_normal((4, 7))
    biases = {
        "alibi": (flex.alibi(slopes, 1), -slopes[:, None, None] * np.abs(QI + 1 - KJ)),
        "relative": (flex.relative_bias(table, 3), table[:, np.clip(KJ - QI, -3, 3) + 3]),
        "table": (flex.bias_mod(np.broadcast_to(table[:, :1, None], (2, 4, 13, 13))),
                  np.broadcast_to(table[:, :1, None], (4, 13, 13))),
    }
    convert, scope = _framework(backend)
    with scope:
        for name, (mod, bias) in biases.items():
            got = ar.attention(*(convert(x) for x in (Q, K, V)), score_mod=mod, backend=backend)
            want = ar.attention(*(convert(x) for x in (Q, K, V)), bias=convert(np.ascontiguousarray(bias)),
                                dense=True, backend=backend)
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-14, err_msg=name)
        capped = ar.attention(*(convert(x) for x in (Q, K, V)), score_mod=flex.softcap_mod(0.7), backend=backend)
        want = ar.attention(*(convert(x) for x in (Q, K, V)), softcap=0.7, dense=True, backend=backend)
        np.testing.assert_allclose(np.asarray(capped), np.asarray(want), rtol=0, atol=1e-14)


def test_h_is_the_query_head_and_b_the_flattened_batch() -> None:
    seen: dict[str, Any] = {}

    def score_mod(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        seen.update(b=np.broadcast_to(b, score.shape), h=np.broadcast_to(h, score.shape), shape=score.shape)
        return score + 0.5 * h - 0.25 * b

    q, k, v = RNG.standard_normal((3, 2, 4, 5, 8)), RNG.standard_normal((3, 2, 2, 6, 8)), RNG.standard_normal(
        (3, 2, 2, 6, 8))
    got = ar.attention(q, k, v, score_mod=score_mod)
    heads, batch = np.arange(4)[:, None, None], np.arange(6).reshape(3, 2, 1, 1, 1)
    np.testing.assert_allclose(got, ar.attention(q, k, v, bias=0.5 * heads - 0.25 * batch), rtol=0, atol=1e-14)
    assert seen["h"].max() == 3 and seen["b"].max() == 5  # query heads 0..3 (GQA 4/2), batch elements 0..5
    assert seen["shape"] == (3, 2, 4, 5, 6)  # the logits' own shape (*B, Hq, L, S), not a grouped layout


def test_the_score_is_the_scaled_logit_before_the_softcap_and_bias() -> None:
    scores: list[np.ndarray] = []

    def score_mod(score: Any, *indices: Any) -> Any:
        scores.append(np.array(score))
        return score

    bias = RNG.standard_normal((4, 13, 13))
    ar.attention(Q, K, V, score_mod=score_mod, softcap=2.0, bias=bias, scale=0.3)
    raw = 0.3 * np.einsum("bhle,bhse->bhls", Q, np.repeat(K, 2, axis=1))
    np.testing.assert_allclose(scores[0].reshape(raw.shape), raw, rtol=0, atol=1e-14)


def test_a_minus_inf_score_excludes_its_key_and_a_row_of_them_is_zero() -> None:
    result = ar.attention(Q, K, V, score_mod=lambda s, b, h, i, j: np.where(i == 0, -np.inf, s), return_lse=True)
    assert (result.out[:, :, 0] == 0).all() and (result.lse[:, :, 0] == -np.inf).all()
    assert np.isfinite(result.out).all()


def test_bad_programs_raise_the_same_errors_on_every_backend() -> None:
    for backend in ("numpy", "jax", "torch"):
        convert, scope = _framework(backend)
        with scope:
            q, k, v = (convert(x) for x in (Q, K, V))
            with pytest.raises(TypeError, match="score_mod must be a callable or None, got int"):
                ar.attention(q, k, v, score_mod=3, backend=backend)
            with pytest.raises(TypeError, match="mask_mod must return booleans"):
                ar.attention(q, k, v, mask_mod=lambda b, h, i, j: i - j, backend=backend)
            with pytest.raises(TypeError, match="score_mod must return floating scores"):
                ar.attention(q, k, v, score_mod=lambda s, b, h, i, j: i - j, backend=backend)
            with pytest.raises(ValueError, match="does not broadcast to the logits"):
                wrong = convert(np.ones((3, 13), bool))
                ar.attention(q, k, v, mask_mod=lambda b, h, i, j, wrong=wrong: wrong, backend=backend)
            with pytest.raises(ValueError, match=r"a score_mod runs on the dense logits \(rule 22\)"):
                ar.attention(q, k, v, score_mod=lambda s, *a: s, block_k=4, backend=backend)
    torch = import_or_skip("torch")
    with pytest.raises(TypeError, match=r"mask_mod must return an array of the backend's framework \(torch\)"):
        ar.attention(*(torch.as_tensor(x) for x in (Q, K, V)), mask_mod=lambda b, h, i, j: np.ones((13, 13), bool))
    with pytest.raises(NotImplementedError, match="numpy backend cannot differentiate a score_mod"):
        ar.attention_vjp(Q, K, V, np.ones((2, 4, 13, 3)), score_mod=lambda s, *a: s)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_gradients_through_a_score_mod_equal_those_through_the_bias(backend: str) -> None:
    bias = RNG.standard_normal((2, 4, 13, 13))
    d_out = RNG.standard_normal((2, 4, 13, 3))
    convert, scope = _framework(backend)
    want = ar.attention_vjp(Q, K, V, d_out, bias=bias, mask=KJ <= QI)
    with scope:
        got = ar.attention_vjp(*(convert(x) for x in (Q, K, V, d_out)), score_mod=flex.bias_mod(bias),
                               mask_mod=flex.causal_mask(), backend=backend)
    for name, a, b in zip(("dq", "dk", "dv"), got[:3], want[:3], strict=False):
        np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=1e-13, err_msg=name)


# ---- materialize: against torch's own BlockMask and flex_attention ------------------------------------


@pytest.mark.parametrize("block", [4, 128])
@pytest.mark.parametrize("name", list(MASKS))
def test_materialize_equals_create_mask(name: str, block: int) -> None:
    import_or_skip("torch")
    from torch.nn.attention.flex_attention import create_block_mask, create_mask

    mod, pattern = MASKS[name]
    block_mask = create_block_mask(mod, None, None, 13, 13, device="cpu", BLOCK_SIZE=block)
    dense = flex.materialize(block_mask)
    assert dense.shape == (1, 1, 13, 13)
    np.testing.assert_array_equal(dense[0, 0], create_mask(mod, 1, 1, 13, 13, device="cpu").numpy()[0, 0])
    np.testing.assert_array_equal(dense[0, 0], pattern)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # inductor's own, while it compiles
def test_materialize_is_block_granular_as_flex_attention_is() -> None:
    """Full blocks are attended whole whatever the mask_mod says; partial blocks follow it; it is what
    the compiled flex_attention computes (eager flex_attention does not: it runs mask_mod everywhere)."""
    torch = import_or_skip("torch")
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

    causal = create_block_mask(flex.causal_mask(), None, None, 8, 8, device="cpu", BLOCK_SIZE=4)
    never = BlockMask.from_kv_blocks(causal.kv_num_blocks, causal.kv_indices, causal.full_kv_num_blocks,
                                     causal.full_kv_indices, BLOCK_SIZE=4, mask_mod=lambda b, h, i, j: i < 0,
                                     seq_lengths=(8, 8))
    dense = flex.materialize(never)[0, 0]
    expected = np.zeros((8, 8), bool)
    expected[4:, :4] = True  # the one full block; the diagonal blocks are partial and mask_mod says no
    np.testing.assert_array_equal(dense, expected)
    q, k, v = (torch.as_tensor(RNG.standard_normal((1, 2, 8, 8)), dtype=torch.float32) for _ in range(3))
    ours = ar.attention(q, k, v, mask=torch.as_tensor(dense))
    torch._dynamo.reset()
    compiled = torch.compile(flex_attention, fullgraph=True)(q, k, v, block_mask=never)
    np.testing.assert_allclose(compiled.numpy(), ours.numpy(), rtol=0, atol=1e-6)
    # A finding (torch 2.13, CPU): eager flex_attention runs mask_mod on every element, full blocks
    # included, so here it attends nothing where the compiled kernel attends the full block.
    eager = flex_attention(q, k, v, block_mask=never)
    assert (eager == 0).all() and (ours[0, :, 4:] != 0).any()


def test_flex_attention_runs_our_programs_as_we_do() -> None:
    torch = import_or_skip("torch")
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q, k, v = (torch.as_tensor(x) for x in (Q, np.repeat(K, 2, axis=1), np.repeat(V, 2, axis=1)))
    for name, (mod, _) in MASKS.items():
        block_mask = create_block_mask(mod, None, None, 13, 13, device="cpu", BLOCK_SIZE=4)
        np.testing.assert_allclose(flex_attention(q, k, v, block_mask=block_mask).numpy(),
                                   ar.attention(q, k, v, mask_mod=mod).numpy(), rtol=0, atol=1e-14, err_msg=name)
    for mod in (flex.alibi(flex.alibi_slopes(4)), flex.relative_bias(RNG.standard_normal((4, 5)), 2),
                flex.softcap_mod(1.5)):
        np.testing.assert_allclose(flex_attention(q, k, v, score_mod=mod).numpy(),
                                   ar.attention(q, k, v, score_mod=mod).numpy(), rtol=0, atol=1e-14)


# ---- the checker's flex interface ----------------------------------------------------------------------


def test_the_flex_interface_checks_rule_22() -> None:
    import_or_skip("torch")
    from .zoo import make_kernel

    supports = ("scale", "causal", "gqa", "lse")
    report = check(make_kernel(), framework="torch", supports=supports, interface="flex", max_examples=15, seed=0)
    assert report.passed, report.render()
    ran = {o.name for o in report.outcomes if o.status.counted}
    assert {"mask_mod_equals_explicit_mask", "bias_only_score_mod_equals_bias",
            "softcap_score_mod_equals_softcap", "matches_float64_oracle"} <= ran
    buggy = check(make_kernel(score_mod_given_kv_head=True), framework="torch", supports=supports, interface="flex",
                  max_examples=50, seed=0, properties=("bias_only_score_mod_equals_bias",))
    assert {o.name: o.status for o in buggy.outcomes}["bias_only_score_mod_equals_bias"] == Status.FAIL
