"""rule 22: score and mask programs: a ``mask_mod`` equals the explicit mask of its pattern, and a
bias-only ``score_mod`` (an explicit table, ALiBi, a relative-position bias) equals ``bias=`` with that
bias, a softcap ``score_mod`` equals ``softcap=``, and a ``score_mod`` runs on the scaled logits before
the softcap and the bias; ``h`` is the query head under GQA.

Each property calls the implementation with the mod and holds it to the float64 oracle of the same
case written without it (the explicit mask, bias or softcap, computed here independently of
``attention_ref.flex``), within that case's tolerance.

PYTEST_DONT_REWRITE: pytest rewrites the asserts of a plugin's distribution (the ``pytest11``
entry point makes this package one); this module's assertion messages are reported as written.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from hypothesis import strategies as st

from ... import flex
from ...varlen import varlen_mask
from ..assertions import assert_attention_close
from ..cases import AttentionCase, full_results
from ..implementation import Subject
from ..runner import attention_property
from ..strategies import Features, feature_cases
from ._common import SEEDS

#: The mask programs drawn: FlexAttention's common ones and a data-dependent table.
MASK_KINDS = ("causal", "window", "prefix", "document", "table")
#: The bias-only score programs drawn.
BIAS_KINDS = ("table", "alibi", "relative")


def _flat_shape(case: AttentionCase) -> tuple[int, int, int, int]:
    """``(prod(B), Hq, L, S)``: the logits with the batch dims flattened, as ``b`` indexes them (rule 22)."""
    return (math.prod(case.batch_shape), case.num_q_heads, case.q_len, case.kv_len)


def _positions(case: AttentionCase) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(case.q_len)[:, None], np.arange(case.kv_len)[None, :]


def _segmentation(rng: np.random.Generator, length: int, segments: int) -> np.ndarray:
    """``cu_seqlens`` of ``segments`` segments (some possibly empty) over at most ``length`` tokens."""
    cuts = np.sort(rng.integers(0, length + 1, segments))
    return np.concatenate([[0], cuts]).astype(np.int64)


def mask_program(case: AttentionCase, kind: str, seed: int) -> tuple[Any, np.ndarray, str]:
    """``(mask_mod, pattern, description)``: a mask program of ``kind`` for the case, and its explicit
    pattern (boolean, broadcastable to the case's logits) computed without the program."""
    rng = np.random.default_rng(seed)
    i, j = _positions(case)
    if kind == "causal":
        offset = int(rng.integers(-case.q_len, case.kv_len + 1))
        return flex.causal_mask(offset), np.tril(np.ones((case.q_len, case.kv_len), bool), offset), \
            f"causal_mask({offset})"
    if kind == "window":
        left, right = (None if rng.random() < 0.25 else int(rng.integers(0, 4)) for _ in range(2))
        offset = int(rng.integers(-2, 3))
        pattern = np.ones((case.q_len, case.kv_len), bool)
        if left is not None:
            pattern &= j >= i + offset - left
        if right is not None:
            pattern &= j <= i + offset + right
        return flex.sliding_window_mask(left, right, offset), pattern, f"sliding_window_mask({left}, {right}, {offset})"
    if kind == "prefix":
        prefix = int(rng.integers(0, case.kv_len + 1))
        return flex.prefix_lm_mask(prefix), (j < prefix) | (j <= i), f"prefix_lm_mask({prefix})"
    if kind == "document":
        segments = int(rng.integers(1, 4))
        cu_q, cu_k = _segmentation(rng, case.q_len, segments), _segmentation(rng, case.kv_len, segments)
        pattern = varlen_mask(cu_q, cu_k, total_q=case.q_len, total_k=case.kv_len)  # rule 20's block diagonal
        return flex.document_mask(cu_q, cu_k), pattern, f"document_mask({cu_q.tolist()}, {cu_k.tolist()})"
    table = rng.random(_flat_shape(case)) < 0.7
    return flex.mask_from_array(table), table.reshape(case.logits_shape), "mask_from_array(a random table)"


def bias_program(case: AttentionCase, kind: str, seed: int) -> tuple[Any, np.ndarray, str]:
    """``(score_mod, bias, description)``: a bias-only score program of ``kind`` and its explicit bias
    (the case's logits shape, in its compute dtype, so that both add the same values)."""
    rng = np.random.default_rng(seed)
    compute = np.dtype(case.default_compute_dtype)
    heads = case.num_q_heads
    i, j = _positions(case)
    if kind == "table":
        table = (2 * rng.standard_normal(_flat_shape(case))).astype(compute)
        table[rng.random(table.shape) < 0.1] = -np.inf  # rule 8: a -inf score excludes its key
        return flex.bias_mod(table), table.reshape(case.logits_shape), "bias_mod(a random table with -inf)"
    if kind == "alibi":
        slopes, offset = flex.alibi_slopes(heads).astype(compute), int(rng.integers(-2, 3))
        per_head = -slopes.astype(np.float64)[:, None, None] * np.abs(i + offset - j)
        bias = np.broadcast_to(per_head.astype(compute), (*case.batch_shape, heads, case.q_len, case.kv_len))
        return flex.alibi(slopes, offset), bias.reshape(case.logits_shape), f"alibi(alibi_slopes({heads}), {offset})"
    distance = int(rng.integers(0, 4))
    table = rng.standard_normal((heads, 2 * distance + 1)).astype(compute)
    per_head = table[:, np.clip(j - i, -distance, distance) + distance]
    bias = np.broadcast_to(per_head, (*case.batch_shape, heads, case.q_len, case.kv_len))
    return flex.relative_bias(table, distance), bias.reshape(case.logits_shape), f"relative_bias(table, {distance})"


def _noted(error: AssertionError, description: str) -> AssertionError:
    error.add_note(f"the program: {description}")
    return error


def _mask_strategy(features: Features) -> st.SearchStrategy[Any] | None:
    cases = feature_cases(features, dropout=False)
    return None if cases is None else st.tuples(cases, st.sampled_from(MASK_KINDS), SEEDS)


def _bias_strategy(features: Features) -> st.SearchStrategy[Any] | None:
    cases = feature_cases(features, bias=False, softcap=False, dropout=False)
    return None if cases is None else st.tuples(cases, st.sampled_from(BIAS_KINDS), SEEDS)


def _softcap_strategy(features: Features) -> st.SearchStrategy[Any] | None:
    cases = feature_cases(features, softcap=False, dropout=False)
    caps = st.sampled_from((0.5, 1.0, 2.5, 30.0))
    return None if cases is None else st.tuples(cases, caps)


def _order_strategy(features: Features) -> st.SearchStrategy[Any] | None:
    cases = feature_cases(features, dropout=False)
    return None if cases is None else st.tuples(cases, st.sampled_from((0.25, 0.5, 2.0, 4.0)))


@attention_property("mask_mod_equals_explicit_mask", (22,), strategy=_mask_strategy, requires=("mask_mod",))
def mask_mod_equals_explicit_mask(subject: Subject, example: tuple[AttentionCase, str, int]) -> None:
    """A mask_mod (causal, window, prefix-LM, documents, a table) equals the explicit mask of its pattern,
    intersected with the case's mask."""
    case, kind, seed = example
    mod, pattern, description = mask_program(case, kind, seed)
    explicit = case.replace(mask=pattern if case.mask is None else np.asarray(case.mask) & pattern)
    try:
        assert_attention_close(full_results(subject.impl, case.replace(mask_mod=mod)), explicit,
                               calibrated=subject.calibrated)
    except AssertionError as error:
        raise _noted(error, description) from None


@attention_property("bias_only_score_mod_equals_bias", (5, 22), strategy=_bias_strategy, requires=("score_mod",))
def bias_only_score_mod_equals_bias(subject: Subject, example: tuple[AttentionCase, str, int]) -> None:
    """A score_mod that adds a bias (a table with -inf entries, ALiBi, a relative-position bias; h the
    query head) equals bias= with that bias."""
    case, kind, seed = example
    mod, bias, description = bias_program(case, kind, seed)
    try:
        assert_attention_close(full_results(subject.impl, case.replace(score_mod=mod)), case.replace(bias=bias),
                               calibrated=subject.calibrated)
    except AssertionError as error:
        raise _noted(error, description) from None


@attention_property("softcap_score_mod_equals_softcap", (4, 22), strategy=_softcap_strategy, requires=("score_mod",))
def softcap_score_mod_equals_softcap(subject: Subject, example: tuple[AttentionCase, float]) -> None:
    """The score_mod ``c * tanh(score / c)`` equals softcap=c (a score_mod runs before the bias, as the
    softcap does)."""
    case, cap = example
    try:
        assert_attention_close(full_results(subject.impl, case.replace(score_mod=flex.softcap_mod(cap))),
                               case.replace(softcap=cap), calibrated=subject.calibrated)
    except AssertionError as error:
        raise _noted(error, f"softcap_mod({cap})") from None


@attention_property("score_mod_runs_before_softcap_and_bias", (3, 4, 5, 22), strategy=_order_strategy,
                    requires=("score_mod",))
def score_mod_runs_before_softcap_and_bias(subject: Subject, example: tuple[AttentionCase, float]) -> None:
    """The score_mod ``c * score`` (c a power of two, so exact) equals the scale ``c * scale``, with the
    case's softcap and bias: the program sees the scaled logits, before the softcap and the bias."""
    case, factor = example

    def times(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return score * factor

    try:
        assert_attention_close(full_results(subject.impl, case.replace(score_mod=times)),
                               case.replace(scale=factor * case.resolved_scale), calibrated=subject.calibrated)
    except AssertionError as error:
        raise _noted(error, f"score * {factor}") from None
