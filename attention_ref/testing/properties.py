"""The conformance properties of SPEC.md, each written once as a function of an implementation.

An *implementation* is any object with ``attention(q, k, v, **keywords)`` taking the spec's keyword
names, ``asarray(numpy_array)`` and ``to_numpy(array)``: our backends, or an adapter around someone
else's kernel. Each :class:`Property` names the SPEC.md rules it proves, a Hypothesis strategy of
cases, and a check that raises AssertionError on a violation. ``run_property`` runs one.

Every tolerance comes from ``bounds_for(impl, case)`` (``attention_ref.tolerance``): the derived
bound for implementations of SPEC.md, the calibrated rule for implementations that set
``calibrated_tolerance = True`` (other people's kernels, through ``check``). Positions the spec
fixes exactly (excluded keys, fully excluded rows, values that must not change) are compared exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import hypothesis
import numpy as np
from hypothesis import assume, given
from hypothesis import settings as Settings
from hypothesis import strategies as st

from ..gradient_tolerance import GradientBounds
from ..result import AttentionOutput, Gradients
from ..tolerance import UNIT_ROUNDOFF, ErrorBounds
from .bad_inputs import check_bad_inputs
from .cases import AttentionCase, call, call_vjp, random_cotangent
from .strategies import ALL_FEATURES, Features, feature_cases, numpy_dtype, random_values

_seeds = st.integers(0, 2**32 - 1)


@dataclass(frozen=True)
class Property:
    """One property of SPEC.md: ``check(impl, example)`` for examples drawn from
    ``strategy(features)``, or ``check(impl)`` once when the property draws no examples."""

    name: str
    rules: tuple[int, ...]
    description: str
    requires: frozenset[str]
    build: Callable[[Features], st.SearchStrategy[Any] | None] | None
    check: Callable[..., None]

    def strategy(self, features: Features = ALL_FEATURES) -> st.SearchStrategy[Any] | None:
        return None if self.build is None else self.build(features)

    def applies_to(self, features: Features) -> bool:
        """Whether an implementation with these features can be checked by this property."""
        return self.requires <= features.supports and (self.build is None or self.strategy(features) is not None)


PROPERTIES: list[Property] = []


def attention_property(
    name: str,
    rules: tuple[int, ...],
    *,
    cases: dict[str, Any] | None = None,
    extra: tuple[st.SearchStrategy[Any], ...] = (),
    requires: tuple[str, ...] = (),
    strategy: Callable[[Features], st.SearchStrategy[Any] | None] | None = None,
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register ``check`` as a property; its docstring's first line is the description.

    Examples are ``feature_cases(features, **cases)``, followed in a tuple by draws from ``extra``;
    or ``strategy(features)``; with neither, the check runs once without examples. ``requires``
    names the features (``attention_ref.testing.strategies.SPEC_FEATURES``) it cannot do without.
    """

    def build(features: Features) -> st.SearchStrategy[Any] | None:
        if strategy is not None:
            return strategy(features)
        base = feature_cases(features, **(cases or {}))
        return None if base is None else (st.tuples(base, *extra) if extra else base)

    def register(check: Callable[..., None]) -> Callable[..., None]:
        description = (check.__doc__ or name).strip().splitlines()[0]
        draws = cases is not None or extra or strategy is not None
        PROPERTIES.append(Property(name, rules, description, frozenset(requires), build if draws else None, check))
        return check

    return register


def get_property(name: str) -> Property:
    for prop in PROPERTIES:
        if prop.name == name:
            return prop
    raise KeyError(name)


def run_property(
    prop: Property,
    impl: Any,
    settings: Settings | None = None,
    seed: int | None = None,
    features: Features = ALL_FEATURES,
) -> None:
    """Run one property against ``impl`` with Hypothesis (current profile unless ``settings``;
    ``seed`` fixes Hypothesis' random choices), drawing only cases within ``features``."""
    if not prop.applies_to(features):
        raise ValueError(f"{prop.name} does not apply to an implementation supporting {sorted(features.supports)}")
    strategy = prop.strategy(features)
    if strategy is None:
        prop.check(impl)
        return

    def test(example: Any) -> None:
        try:
            prop.check(impl, example)
        except AssertionError as error:
            if isinstance(example, tuple) and len(example) > 1:  # the case's messages show the case only
                error.add_note(f"drawn with the case: {example[1:]!r}")
            raise

    # Distinct Hypothesis database keys per property and implementation.
    test._hypothesis_internal_add_digest = f"{prop.name}:{getattr(impl, 'name', impl)}".encode()  # type: ignore[attr-defined]
    wrapped = given(strategy)(test)
    if settings is not None:
        wrapped = settings(wrapped)
    if seed is not None:
        wrapped = hypothesis.seed(seed)(wrapped)
    wrapped()


# ---- comparisons -------------------------------------------------------------------------------


def bounds_for(impl: Any, case: AttentionCase, **kwargs: Any) -> ErrorBounds:
    """The tolerance ``impl`` is held to on ``case``: ``case.bounds(**kwargs)``, calibrated when
    ``impl.calibrated_tolerance`` is true."""
    return case.bounds(calibrated=bool(getattr(impl, "calibrated_tolerance", False)), **kwargs)


def assert_within(
    what: str,
    actual: np.ndarray,
    expected: np.ndarray,
    bound: np.ndarray | float,
    case: AttentionCase,
    *,
    exact: np.ndarray | None = None,
    derivation: str = "",
) -> None:
    """``|actual - expected| <= bound`` elementwise; equality where ``exact`` (and wherever
    ``expected`` is infinite); NaN never passes. The message shows the worst element, its error and
    bound, and ``derivation`` (how the bound was obtained)."""
    __tracebackhide__ = True
    actual = np.asarray(actual)
    assert actual.shape == expected.shape, (
        f"{what}: shape {actual.shape}, expected {expected.shape}\n  case: {case!r}"
    )
    a64, e64 = actual.astype(np.float64), np.asarray(expected, dtype=np.float64)
    bound = np.broadcast_to(np.asarray(bound, dtype=np.float64), e64.shape)
    with np.errstate(invalid="ignore"):
        error = np.where(a64 == e64, 0.0, np.abs(a64 - e64))
    must_equal = ~np.isfinite(e64)
    if exact is not None:
        must_equal = must_equal | np.broadcast_to(exact, e64.shape)
    bad = np.isnan(error) | np.where(must_equal, error != 0, error > bound)
    if not bad.any():
        return
    with np.errstate(over="ignore", invalid="ignore"):  # huge errors over tiny bounds: inf ranks first
        ratio = np.where(bad, np.nan_to_num(error / np.where(bound > 0, bound, np.inf), nan=np.inf, posinf=np.inf), -1)
    worst = np.unravel_index(np.argmax(np.where(must_equal & bad, np.inf, ratio)), e64.shape)
    rule = "exactly" if must_equal[worst] else f"within {bound[worst]:.3g}"
    raise AssertionError(
        f"{what}: {int(bad.sum())} of {bad.size} elements wrong; worst at {tuple(int(i) for i in worst)}: "
        f"got {a64[worst]!r}, expected {e64[worst]!r} {rule} (|error| {error[worst]:.3g})\n"
        + (f"  bound: {derivation}\n" if derivation and not must_equal[worst] else "")
        + f"  case: {case!r}"
    )


def assert_finite(what: str, result: AttentionOutput, case: AttentionCase) -> None:
    __tracebackhide__ = True
    for name, x in zip(("out", "weights", "lse"), result):
        if x is None:
            continue
        x64 = np.asarray(x, dtype=np.float64)
        nan_or_inf = np.isnan(x64) | (np.isinf(x64) if name != "lse" else np.isposinf(x64))
        assert not nan_or_inf.any(), (
            f"{what}: {name} has {int(nan_or_inf.sum())} NaN/inf values at "
            f"{[tuple(int(i) for i in ix) for ix in np.argwhere(nan_or_inf)[:3]]}\n  case: {case!r}"
        )


def full_results(impl: Any, case: AttentionCase, **kwargs: Any) -> AttentionOutput:
    return call(impl, case, return_weights=True, return_lse=True, **kwargs)


def assert_matches(result: AttentionOutput, expected: AttentionOutput, bounds: Any, case: AttentionCase) -> None:
    """out, weights and lse within ``bounds`` (an ErrorBounds) of ``expected``; exact where rule 8
    fixes the value (excluded keys, fully excluded rows)."""
    __tracebackhide__ = True
    allowed = case.allowed()
    fully_excluded = ~allowed.any(axis=-1)
    how = bounds.derivation
    assert_within("out", result.out, expected.out, bounds.out, case, exact=fully_excluded[..., None], derivation=how)
    if result.weights is not None:
        assert_within("weights", result.weights, expected.weights, bounds.weights, case, exact=~allowed,
                      derivation=how)
    if result.lse is not None:
        assert_within("lse", result.lse, expected.lse, bounds.lse, case, exact=fully_excluded, derivation=how)


def assert_attention_close(actual: AttentionOutput | np.ndarray, case: AttentionCase, *,
                           calibrated: bool = True) -> None:
    """The tolerance rule: ``actual`` (an ``AttentionOutput`` of NumPy arrays, or the bare out array)
    matches the float64 oracle of ``case``.

    Elementwise within the bound of ``attention_ref.tolerance``: the calibrated rule for other
    people's kernels (default) or, with ``calibrated=False``, the derived bound SPEC.md holds its own
    backends to; exactly where SPEC.md fixes the value (excluded keys: weight 0; fully excluded rows:
    out 0, weights 0, lse -inf). NaN never passes. Raises AssertionError showing the worst element,
    its error, the bound and its derivation, and the case.
    """
    __tracebackhide__ = True
    if not isinstance(actual, AttentionOutput):
        actual = AttentionOutput(np.asarray(actual))
    oracle = case.oracle()
    assert_matches(actual, oracle, case.bounds(oracle=oracle, calibrated=calibrated), case)


def assert_matches_oracle(impl: Any, case: AttentionCase, result: AttentionOutput | None = None) -> None:
    """The results of ``impl`` (or ``result``) match the float64 oracle within ``impl``'s tolerance."""
    __tracebackhide__ = True
    result = full_results(impl, case) if result is None else result
    assert_attention_close(result, case, calibrated=bool(getattr(impl, "calibrated_tolerance", False)))


def assert_same_results(
    first: AttentionOutput, second: AttentionOutput, bound: Any, case: AttentionCase, what: str
) -> None:
    """Two results that the spec says are equal, within ``bound`` (an ErrorBounds) or exactly
    (``bound=None``)."""
    __tracebackhide__ = True
    for name in ("out", "weights", "lse"):
        a, b = getattr(first, name), getattr(second, name)
        if a is None or b is None:
            continue
        assert_within(f"{what}: {name}", a, b, 0.0 if bound is None else getattr(bound, name), case,
                      exact=None if bound is not None else np.ones(b.shape, bool),
                      derivation="" if bound is None else bound.derivation)


def _broadcast_full(x: np.ndarray | None, shape: tuple[int, ...], fill: Any, dtype: Any) -> np.ndarray:
    base = np.full((), fill, dtype=dtype) if x is None else x
    return np.broadcast_to(base, shape).copy()


def _with_new_kv(case: AttentionCase, keys: np.ndarray, rng: np.random.Generator) -> AttentionCase:
    """The case with k and v at the key positions ``keys`` (bool, ``(S,)``) replaced by new values."""
    dtype = numpy_dtype(case.dtype)
    k, v = case.k.copy(), case.v.copy()
    k[..., keys, :] = random_values(rng, k[..., keys, :].shape, "normal", 5.0).astype(dtype)
    v[..., keys, :] = random_values(rng, v[..., keys, :].shape, "normal", 5.0).astype(dtype)
    return case.replace(k=k, v=v)


# ---- rule 1, 2, 3, 4, 5, 6, 7, 10: agreement with the oracle -----------------------------------


@attention_property("matches_float64_oracle", (1, 2, 3, 4, 5, 6, 7, 10), cases={})
def matches_float64_oracle(impl: Any, case: AttentionCase) -> None:
    """out, weights and lse match the float64 oracle within the tolerance rule (every feature, every dtype)."""
    assert_matches_oracle(impl, case)


# ---- rule 8: exclusion ---------------------------------------------------------------------------


@attention_property("weights_rows_sum_to_one", (8, 11), cases={}, requires=("weights",))
def weights_rows_sum_to_one(impl: Any, case: AttentionCase) -> None:
    """Each row of weights sums to 1, or is all 0 when the row is fully excluded."""
    result = full_results(impl, case)
    bounds = bounds_for(impl, case)
    attended = case.allowed().any(axis=-1)
    sums = np.asarray(result.weights, np.float64).sum(axis=-1)
    bound = bounds.weights.sum(axis=-1) + case.kv_len * UNIT_ROUNDOFF["float64"]
    assert_within("sum of weights", sums, attended.astype(np.float64), bound, case, exact=~attended)


@attention_property("excluded_keys_get_zero_weight", (8,), cases={}, extra=(_seeds,), requires=("mask",))
def excluded_keys_get_zero_weight(impl: Any, example: tuple[AttentionCase, int]) -> None:
    """Excluded keys get weight exactly 0, and changing their k and v changes nothing."""
    case, seed = example
    rng = np.random.default_rng(seed)
    hidden = rng.random(case.kv_len) < 0.5
    mask = _broadcast_full(case.mask, case.logits_shape, True, bool)
    mask[..., hidden] = False
    case = case.replace(mask=mask)
    result = full_results(impl, case)
    allowed = case.allowed()
    if result.weights is not None:
        assert_within("weights of excluded keys", np.where(allowed, 0, result.weights),
                      np.zeros(allowed.shape), 0.0, case, exact=np.ones(allowed.shape, bool))
    changed = _with_new_kv(case, hidden, rng)
    assert_same_results(full_results(impl, changed), result, None, changed, "after changing excluded k/v")


@attention_property("output_within_attended_values", (8, 11), cases={})
def output_within_attended_values(impl: Any, case: AttentionCase) -> None:
    """Each output lies within the range of the attended v rows (per channel); fully excluded rows are 0.
    With dropout, within that range widened to include 0, times 1 / (1 - p) (kept weights sum to <= 1)."""
    result = full_results(impl, case)
    bounds = bounds_for(impl, case)
    allowed = case.allowed()[..., None]
    _, v = case.repeated_kv()
    v64 = np.asarray(v, np.float64)[..., None, :, :]
    low = np.where(allowed, v64, np.inf).min(axis=-2, initial=np.inf)
    high = np.where(allowed, v64, -np.inf).max(axis=-2, initial=-np.inf)
    if case.dropout_mask is not None:
        factor = 1.0 / (1.0 - case.dropout_p)
        low, high = factor * np.minimum(low, 0.0), factor * np.maximum(high, 0.0)
    out = np.asarray(result.out, np.float64)
    fully_excluded = ~allowed.any(axis=-2)
    clipped = np.where(fully_excluded, 0.0, np.clip(out, low, high))
    assert_within("out vs range of attended v", out, clipped, bounds.out, case,
                  exact=np.broadcast_to(fully_excluded, out.shape))


def _fully_excluded_examples(features: Features) -> st.SearchStrategy[Any]:
    mechanisms = [m for m, needs in (("mask_row", ("mask",)), ("bias_row", ("bias",)),
                                     ("bottom_right_causal", ("causal", "bottom_right")), ("no_keys", ()))
                  if all(n in features for n in needs)]
    long_queries = feature_cases(features, min_q_len=4, max_kv_len=3, long_kv_len=None)  # L > S
    return st.tuples(st.sampled_from(mechanisms), feature_cases(features, min_q_len=1), long_queries, _seeds)


@attention_property("fully_excluded_rows_are_zero", (1, 8), strategy=_fully_excluded_examples)
def fully_excluded_rows_are_zero(impl: Any, example: tuple[str, AttentionCase, AttentionCase, int]) -> None:
    """Rows excluded by mask, -inf bias, bottom-right causal (L > S) or S = 0 give out 0, weights 0,
    lse -inf; nothing is NaN."""
    mechanism, case, long_query_case, seed = example
    rng = np.random.default_rng(seed)
    rows = rng.random(case.q_len) < 0.5
    rows[rng.integers(case.q_len)] = True
    if mechanism == "mask_row":
        mask = _broadcast_full(case.mask, case.logits_shape, True, bool)
        mask[..., rows, :] = False
        case = case.replace(mask=mask)
    elif mechanism == "bias_row":
        bias = _broadcast_full(case.bias, case.logits_shape, 0.0, numpy_dtype(case.dtype))
        bias[..., rows, :] = -np.inf
        case = case.replace(bias=bias)
    elif mechanism == "bottom_right_causal":
        case = long_query_case.replace(causal=True, alignment="bottom_right")
    else:
        def without_keys(x: np.ndarray | None) -> np.ndarray | None:
            return x if x is None or x.ndim == 0 or x.shape[-1] == 1 else x[..., :0]

        case = case.replace(k=case.k[..., :0, :], v=case.v[..., :0, :], mask=without_keys(case.mask),
                            bias=without_keys(case.bias), dropout_mask=without_keys(case.dropout_mask))
    fully_excluded = ~case.allowed().any(axis=-1)
    assert fully_excluded.any() or case.q.size == 0 or math.prod(case.logits_shape[:-2]) == 0
    result = full_results(impl, case)
    assert_finite("fully excluded rows", result, case)
    assert_matches_oracle(impl, case, result)


@attention_property("neg_inf_bias_equals_mask", (5, 8), cases=dict(bias=True, neg_inf_bias=True), requires=("mask",))
def neg_inf_bias_equals_mask(impl: Any, case: AttentionCase) -> None:
    """A -inf bias entry excludes its key exactly as a False mask entry does."""
    bias64 = np.broadcast_to(np.asarray(case.bias, np.float64), case.logits_shape)
    mask = _broadcast_full(case.mask, case.logits_shape, True, bool) & (bias64 != -np.inf)
    masked = case.replace(mask=mask, bias=np.where(bias64 == -np.inf, 0.0, bias64).astype(case.bias.dtype))
    bound = 2 * bounds_for(impl, case)
    assert_same_results(full_results(impl, case), full_results(impl, masked), bound, case, "-inf bias vs mask")


# ---- rule 3: scale -------------------------------------------------------------------------------


def _distinct_head_dims(features: Features) -> st.SearchStrategy[Any] | None:
    """Cases with E != Ev where the implementation allows them (else E = Ev)."""
    cases = feature_cases(features, scale=False, rank2=False, min_value_dim=1)
    if cases is None or "value_dim" not in features:
        return cases
    return cases.filter(lambda c: c.head_dim != c.value_dim)


@attention_property("default_scale_is_inverse_sqrt_head_dim", (3,), strategy=_distinct_head_dims)
def default_scale_is_inverse_sqrt_head_dim(impl: Any, case: AttentionCase) -> None:
    """scale=None gives the oracle's result for an explicit scale of 1/sqrt(E) (E != Ev where allowed)."""
    explicit = case.replace(scale=1.0 / math.sqrt(case.head_dim))
    assert_matches_oracle(impl, explicit, full_results(impl, case))


@attention_property("zero_scale_averages_attended_values", (3, 8), cases=dict(bias=False), requires=("scale",))
def zero_scale_averages_attended_values(impl: Any, case: AttentionCase) -> None:
    """scale=0 gives the plain mean of the attended v rows (each times its dropout multiplier)."""
    case = case.replace(scale=0.0)
    result = full_results(impl, case)
    allowed = case.allowed()
    _, v = case.repeated_kv()
    counts = allowed.sum(axis=-1, keepdims=True)
    mean = np.matmul(allowed / np.maximum(counts, 1) * case.dropout_multiplier(), np.asarray(v, np.float64))
    assert_within("out", result.out, mean, bounds_for(impl, case).out, case, exact=(counts == 0))


@attention_property("scale_is_homogeneous", (3,), cases={}, extra=(st.sampled_from((2.0, 4.0, -1.0, -2.0)),),
                    requires=("scale",))
def scale_is_homogeneous(impl: Any, example: tuple[AttentionCase, float]) -> None:
    """attention(c·q, k, scale=s) equals attention(q, k, scale=c·s)."""
    case, factor = example
    scaled_q = np.asarray(case.q, np.float64) * factor
    rounded_q = scaled_q.astype(case.q.dtype)
    assume(np.array_equal(rounded_q.astype(np.float64), scaled_q))  # c·q exact in the dtype
    scale = case.resolved_scale
    first = case.replace(q=rounded_q, scale=scale)
    second = case.replace(scale=factor * scale)
    assert_same_results(full_results(impl, first), full_results(impl, second), 2 * bounds_for(impl, second), second,
                        f"q scaled by {factor}")


@attention_property("large_scale_selects_extreme_key", (3, 9), cases=dict(bias=False, softcap=False, dropout=False),
                    extra=(st.booleans(),), requires=("scale",))
def large_scale_selects_extreme_key(impl: Any, example: tuple[AttentionCase, bool]) -> None:
    """A large positive scale tends to the argmax key's v (negative: the argmin key's)."""
    case, negative = example
    k, v = case.repeated_kv()
    dots = np.matmul(np.asarray(case.q, np.float64), np.swapaxes(np.asarray(k, np.float64), -1, -2))
    dots = -dots if negative else dots
    allowed = case.with_positions_as_mask().replace(scale=1.0).allowed()
    ranked = np.sort(np.where(allowed, dots, -np.inf), axis=-1)
    attended = allowed.sum(axis=-1)
    sizes = np.matmul(np.abs(np.asarray(case.q, np.float64)), np.swapaxes(np.abs(np.asarray(k, np.float64)), -1, -2))
    size = np.where(allowed, sizes, 0).max(axis=-1, initial=0.0)
    gap = np.full(attended.shape, np.inf)
    if case.kv_len >= 2:
        with np.errstate(invalid="ignore"):
            gap = np.where(attended >= 2, ranked[..., -1] - ranked[..., -2], gap)
    # Rows whose extreme key is unique by a margin that float32 logits resolve.
    checked = (attended >= 1) & (gap > 0) & (gap >= 1e-3 * size)
    assume(checked.any())
    min_gap = np.where(checked & np.isfinite(gap), gap, np.inf).min(initial=np.inf)
    # With scale = margin / min_gap, every other attended key trails the extreme one by at least
    # `margin` in exact logits. The logit error delta of tolerance.py is at most
    # (E + 1) u |scale| size <= 9 * 2**-24 * 64e3 < 0.04 (gap >= 1e-3 size, E <= 8) in float32, so the
    # computed logits trail by more than margin / 2, each other weight is below exp(-margin / 2),
    # and out differs from the extreme key's v by at most 2 S exp(-margin / 2) max|v|.
    margin = 64.0
    scale = margin / min_gap if np.isfinite(min_gap) else 1.0
    case = case.replace(scale=-scale if negative else scale)
    result = call(impl, case)
    chosen = np.take_along_axis(np.asarray(v, np.float64),
                                np.argmax(np.where(allowed, dots, -np.inf), axis=-1)[..., None], axis=-2)
    value_size = np.abs(np.asarray(v, np.float64)).max(axis=-2, keepdims=True, initial=0.0)
    bound = bounds_for(impl, case).out + 2 * case.kv_len * math.exp(-margin / 2) * value_size
    assert_within("out vs the extreme key's v", np.where(checked[..., None], result.out, 0),
                  np.where(checked[..., None], chosen, 0), bound, case)


# ---- rule 1: permutations and batch dims ----------------------------------------------------------


def _permute(x: np.ndarray | None, perm: np.ndarray, axis: int) -> np.ndarray | None:
    if x is None or x.ndim < -axis or x.shape[axis] == 1:
        return x
    return np.take(x, perm, axis=axis)


def _causal_only_with_mask(features: Features) -> st.SearchStrategy[Any] | None:
    """Cases whose causal pattern can be replaced by the explicit mask (needs mask support)."""
    cases = feature_cases(features, **({} if "mask" in features else {"causal": False}))
    return None if cases is None else st.tuples(cases, _seeds)


@attention_property("key_permutation_invariance", (1, 8), strategy=_causal_only_with_mask)
def key_permutation_invariance(impl: Any, example: tuple[AttentionCase, int]) -> None:
    """Permuting the keys (k, v and the key axis of mask and bias) changes nothing but the weights' order."""
    case, seed = example
    case = case.with_positions_as_mask()
    perm = np.random.default_rng(seed).permutation(case.kv_len)
    permuted = case.replace(k=np.take(case.k, perm, axis=-2), v=np.take(case.v, perm, axis=-2),
                            mask=_permute(case.mask, perm, -1), bias=_permute(case.bias, perm, -1),
                            dropout_mask=_permute(case.dropout_mask, perm, -1))
    first, second = full_results(impl, case), full_results(impl, permuted)
    if second.weights is not None:
        second = second._replace(weights=np.take(second.weights, np.argsort(perm), axis=-1))
    assert_same_results(first, second, 2 * bounds_for(impl, case), case, "keys permuted")


@attention_property("query_permutation_equivariance", (1,), strategy=_causal_only_with_mask)
def query_permutation_equivariance(impl: Any, example: tuple[AttentionCase, int]) -> None:
    """Permuting the queries (q and the query axis of mask and bias) permutes the results the same way."""
    case, seed = example
    case = case.with_positions_as_mask()
    perm = np.random.default_rng(seed).permutation(case.q_len)
    permuted = case.replace(q=np.take(case.q, perm, axis=-2), mask=_permute(case.mask, perm, -2),
                            bias=_permute(case.bias, perm, -2), dropout_mask=_permute(case.dropout_mask, perm, -2))
    first, second = full_results(impl, case), full_results(impl, permuted)
    inverse = np.argsort(perm)
    second = AttentionOutput(*(None if x is None else np.take(x, inverse, axis=axis)
                               for x, axis in zip(second, (-2, -2, -1))))
    assert_same_results(first, second, 2 * bounds_for(impl, case), case, "queries permuted")


@attention_property("batch_dims_equal_a_loop", (1,), cases=dict(min_batch_dims=1))
def batch_dims_equal_a_loop(impl: Any, case: AttentionCase) -> None:
    """Extra leading batch dims give the same results as a loop over them."""
    full = full_results(impl, case)
    bounds = 2 * bounds_for(impl, case)
    full_shape = {name: None if x is None else np.broadcast_to(x, case.logits_shape)
                  for name, x in (("mask", case.mask), ("bias", case.bias), ("dropout_mask", case.dropout_mask))}
    for index in np.ndindex(*case.batch_shape):
        keep = tuple(slice(i, i + 1) for i in index)  # one batch element, batch dims kept
        part = case.replace(q=case.q[keep], k=case.k[keep], v=case.v[keep],
                            **{name: None if x is None else x[keep] for name, x in full_shape.items()})
        result = full_results(impl, part)
        for name in ("out", "weights", "lse"):
            if getattr(result, name) is not None:
                assert_within(f"batch {index}: {name}", getattr(result, name), getattr(full, name)[keep],
                              getattr(bounds, name)[keep], part)


# ---- rule 2: GQA -----------------------------------------------------------------------------------


@attention_property("gqa_equals_repeated_kv_heads", (2,), cases=dict(gqa=True))
def gqa_equals_repeated_kv_heads(impl: Any, case: AttentionCase) -> None:
    """Hq > Hkv equals repeating each kv head Hq/Hkv times (repeat_interleave order)."""
    k, v = case.repeated_kv()
    repeated = case.replace(k=k, v=v)
    assert_same_results(full_results(impl, case), full_results(impl, repeated), 2 * bounds_for(impl, case), case,
                        "GQA vs repeated kv heads")


# ---- rule 4: softcap -------------------------------------------------------------------------------


@attention_property("softcap_bounds_weight_ratios", (4,), cases=dict(softcap=False, bias=False, qk_magnitudes=(3.0, 10.0)),
                    extra=(st.floats(0.05, 4.0),), requires=("softcap", "weights"))
def softcap_bounds_weight_ratios(impl: Any, example: tuple[AttentionCase, float]) -> None:
    """With softcap c (and no bias) every attended key gets weight >= exp(-2c) / (attended keys),
    however large the logits."""
    case, cap = example
    case = case.replace(softcap=cap)
    result = full_results(impl, case)
    allowed = case.allowed()
    counts = allowed.sum(axis=-1, keepdims=True)
    floor = np.where(allowed, math.exp(-2 * cap) / np.maximum(counts, 1), 0.0)
    weights = np.asarray(result.weights, np.float64)
    assert_within("attended weights vs exp(-2c)/n", np.minimum(weights, floor), floor, bounds_for(impl, case).weights, case)


# ---- rule 5: bias ----------------------------------------------------------------------------------


@attention_property("bias_row_constant_changes_nothing", (5,), cases=dict(bias=True), extra=(_seeds,))
def bias_row_constant_changes_nothing(impl: Any, example: tuple[AttentionCase, int]) -> None:
    """Adding a constant to each row of the bias changes neither out nor weights."""
    case, seed = example
    shifts = np.random.default_rng(seed).uniform(-8, 8, (*case.logits_shape[:-1], 1))
    shifted_bias = (np.asarray(case.bias, np.float64) + shifts).astype(case.bias.dtype)
    shifted = case.replace(bias=shifted_bias)
    allowed = case.allowed()
    # Rounding the shifted bias back to its dtype perturbs each logit by up to u·|bias|.
    rounding = UNIT_ROUNDOFF[case.bias.dtype.name] * np.where(
        allowed & np.isfinite(shifted_bias.astype(np.float64)), np.abs(shifted_bias.astype(np.float64)), 0
    ).max(axis=-1, initial=0.0)
    bound_first, bound_second = bounds_for(impl, case), bounds_for(impl, shifted, extra_logit_error=rounding)
    first, second = full_results(impl, case), full_results(impl, shifted)
    for name in ("out", "weights"):
        if getattr(first, name) is not None:
            assert_within(f"bias shifted per row: {name}", getattr(second, name), getattr(first, name),
                          getattr(bound_first, name) + getattr(bound_second, name), case)


# ---- rule 7: causal --------------------------------------------------------------------------------


@attention_property("causal_equals_explicit_mask", (7,), cases=dict(causal=True), requires=("mask",))
def causal_equals_explicit_mask(impl: Any, case: AttentionCase) -> None:
    """causal=True (either alignment) equals the explicit mask j <= i (+ S - L for bottom_right)."""
    assert_same_results(full_results(impl, case), full_results(impl, case.with_positions_as_mask()),
                        2 * bounds_for(impl, case), case, f"causal {case.alignment} vs explicit mask")


@attention_property("causal_ignores_future_keys", (7,), cases=dict(causal=True), extra=(_seeds,))
def causal_ignores_future_keys(impl: Any, example: tuple[AttentionCase, int]) -> None:
    """Under causal, changing the k and v of keys a query cannot see leaves its results unchanged."""
    case, seed = example
    rng = np.random.default_rng(seed)
    cut = int(rng.integers(0, case.kv_len + 1))
    offset = 0 if case.alignment == "top_left" else case.kv_len - case.q_len
    rows = np.arange(case.q_len) + offset < cut  # these rows see no key >= cut
    changed = _with_new_kv(case, np.arange(case.kv_len) >= cut, rng)
    first, second = full_results(impl, case), full_results(impl, changed)
    for name, x, y in (("out", first.out, second.out), ("weights", first.weights, second.weights),
                       ("lse", None if first.lse is None else first.lse[..., None],
                        None if second.lse is None else second.lse[..., None])):
        if x is None or y is None:
            continue
        assert_within(f"rows before key {cut}: {name}", y[..., rows, :], x[..., rows, :], 0.0, case,
                      exact=np.ones(x[..., rows, :].shape, bool))


# ---- rule 9: stability -----------------------------------------------------------------------------


@attention_property("huge_logits_stay_finite", (9,), cases=dict(softcap=False, bias=False, min_kv_len=1, min_q_len=1),
                    extra=(st.booleans(),), requires=("scale",))
def huge_logits_stay_finite(impl: Any, example: tuple[AttentionCase, bool]) -> None:
    """Logits of magnitude 1e4 give finite results that match the oracle."""
    case, negative = example
    k, _ = case.repeated_kv()
    dots = np.abs(np.matmul(np.asarray(case.q, np.float64), np.swapaxes(np.asarray(k, np.float64), -1, -2)))
    largest = dots.max(initial=0.0)
    assume(largest > 0)
    case = case.replace(scale=(-1e4 if negative else 1e4) / largest)
    result = full_results(impl, case)
    assert_finite("huge logits", result, case)
    assert_matches_oracle(impl, case, result)


# ---- rules 10, 11: dtypes and results -----------------------------------------------------------------


@attention_property("result_types_and_dtypes", (1, 10, 11), cases={}, requires=("compute_dtype", "weights", "lse"))
def result_types_and_dtypes(impl: Any, case: AttentionCase) -> None:
    """Output in the input dtype; weights and lse in the compute dtype; the result's form and shapes;
    compute_dtype='float64' computes in float64."""
    out = call(impl, case).out
    heads = case.logits_shape[:-2]
    assert out.dtype == numpy_dtype(case.dtype) and out.shape == (*heads, case.q_len, case.value_dim), (
        f"out: {out.dtype} {out.shape}\n  case: {case!r}")
    arrays = [impl.asarray(x) for x in (case.q, case.k, case.v)]
    extra = {name: None if x is None else impl.asarray(x) for name, x in case.arrays().items()}
    bare = impl.attention(*arrays, **extra, **case.options())
    assert not isinstance(bare, AttentionOutput), "with no flags, attention returns the output array"
    only_weights = impl.attention(*arrays, **extra, **case.options(), return_weights=True)
    only_lse = impl.attention(*arrays, **extra, **case.options(), return_lse=True)
    assert isinstance(only_weights, AttentionOutput) and only_weights.lse is None and only_weights.weights is not None
    assert isinstance(only_lse, AttentionOutput) and only_lse.weights is None and only_lse.lse is not None
    oracle = case.oracle()
    for compute_dtype in dict.fromkeys((case.default_compute_dtype, "float64")):
        result = full_results(impl, case, compute_dtype=compute_dtype)
        assert result.out.dtype == numpy_dtype(case.dtype), f"out dtype {result.out.dtype}\n  case: {case!r}"
        for name, x, shape in (("weights", result.weights, case.logits_shape), ("lse", result.lse, case.logits_shape[:-1])):
            assert x.dtype == np.dtype(compute_dtype) and x.shape == shape, (
                f"{name}: {x.dtype} {x.shape}, expected {compute_dtype} {shape}\n  case: {case!r}")
        bounds = bounds_for(impl, case, compute_dtype=compute_dtype, oracle=oracle)
        assert_within(f"weights with compute_dtype={compute_dtype}", result.weights, oracle.weights, bounds.weights,
                      case, exact=~case.allowed())


# ---- rule 11: weights and lse ---------------------------------------------------------------------------


@attention_property("weights_and_lse_agree_with_output", (11,), cases={}, requires=("weights", "lse"))
def weights_and_lse_agree_with_output(impl: Any, case: AttentionCase) -> None:
    """out = (weights · dropout multiplier) · v, and weights = exp(logits - lse) on attended keys
    (the returned weights are those before dropout)."""
    result = full_results(impl, case)
    oracle = case.oracle()
    bounds = bounds_for(impl, case, oracle=oracle)
    _, v = case.repeated_kv()
    v64 = np.asarray(v, np.float64)
    weights = np.asarray(result.weights, np.float64)
    multiplier = case.dropout_multiplier()
    assert_within("out vs (weights · keep / (1 - p)) · v", result.out, np.matmul(weights * multiplier, v64),
                  bounds.out + np.matmul(bounds.weights * multiplier, np.abs(v64)), case)
    allowed = case.allowed()
    lse = np.asarray(result.lse, np.float64)[..., None]
    with np.errstate(invalid="ignore", over="ignore"):
        from_lse = np.where(allowed, np.exp(case.logits() - np.where(np.isfinite(lse), lse, 0)), 0.0)
    bound = bounds.weights + np.asarray(oracle.weights) * np.expm1(bounds.lse[..., None])
    assert_within("weights vs exp(logits - lse)", weights, from_lse, bound, case, exact=~allowed)


# ---- rule 7: windows ---------------------------------------------------------------------------------


@attention_property("window_equals_explicit_mask", (7,), cases=dict(window=True), requires=("window", "mask"))
def window_equals_explicit_mask(impl: Any, case: AttentionCase) -> None:
    """window=(left, right) (with causal, either alignment) equals the explicit mask
    i + offset - left <= j <= i + offset + right."""
    explicit = case.with_positions_as_mask()
    assert_same_results(full_results(impl, case), full_results(impl, explicit), 2 * bounds_for(impl, case), case,
                        f"window {case.window} ({case.alignment}, causal={case.causal}) vs explicit mask")
    if "grad" in getattr(impl, "features", ALL_FEATURES):
        d_out = random_cotangent(case, case.q_len * 7 + case.kv_len)
        first, second = call_vjp(impl, case, d_out), call_vjp(impl, explicit, d_out)
        assert_same_gradients(first, second, 2 * gradient_bounds_for(impl, case, d_out), case, "window vs explicit mask")


# ---- rule 13: dropout ----------------------------------------------------------------------------------


@attention_property("dropout_equals_manual_computation", (13,), cases=dict(dropout=True), requires=("dropout",))
def dropout_equals_manual_computation(impl: Any, case: AttentionCase) -> None:
    """With dropout_p and a keep-mask, out equals (P · keep / (1 - p)) · v, with P the weights of the
    call without dropout (computed here in float64), and the returned weights are P (before dropout)."""
    result = full_results(impl, case)
    plain = case.replace(dropout_p=0.0, dropout_mask=None).oracle()
    _, v = case.repeated_kv()
    keep = np.broadcast_to(case.dropout_mask, case.logits_shape)
    manual = np.matmul(np.where(keep, np.asarray(plain.weights) / (1.0 - case.dropout_p), 0.0), np.asarray(v, np.float64))
    bounds = bounds_for(impl, case)
    assert_within("out vs manual dropout", result.out, manual, bounds.out, case)
    if result.weights is not None:
        assert_within("weights (before dropout)", result.weights, plain.weights, bounds.weights, case,
                      exact=~case.allowed(), derivation=bounds.derivation)


@attention_property("dropout_all_keep_scales_by_inverse_keep_probability", (13,), cases=dict(dropout=True),
                    requires=("dropout",))
def dropout_all_keep_scales_by_inverse_keep_probability(impl: Any, case: AttentionCase) -> None:
    """An all-keep mask with dropout_p = p gives out / (1 - p) of the call without dropout (so with
    p = 0 it equals no dropout), and the same weights and lse."""
    all_keep = case.replace(dropout_mask=np.ones(case.dropout_mask.shape, bool))
    plain = case.replace(dropout_p=0.0, dropout_mask=None)
    kept, none = full_results(impl, all_keep), full_results(impl, plain)
    factor = 1.0 / (1.0 - case.dropout_p)
    bound_kept, bound_none = bounds_for(impl, all_keep), bounds_for(impl, plain)
    assert_within("out with an all-keep mask vs out / (1 - p)", kept.out, np.asarray(none.out, np.float64) * factor,
                  bound_kept.out + factor * bound_none.out, case)
    assert_same_results(kept._replace(out=None), none._replace(out=None), bound_kept + bound_none, case,
                        "all-keep dropout vs none")


# ---- rule 14: gradients --------------------------------------------------------------------------------


def gradient_bounds_for(impl: Any, case: AttentionCase, d_out: np.ndarray, expected: Gradients | None = None,
                        **kwargs: Any) -> GradientBounds:
    """The gradient tolerance ``impl`` is held to (calibrated when ``impl.calibrated_tolerance``)."""
    expected = case.oracle_gradients(d_out) if expected is None else expected
    return case.gradient_bounds(d_out, expected, calibrated=bool(getattr(impl, "calibrated_tolerance", False)),
                                **kwargs)


_GRADIENT_NAMES = ("dq", "dk", "dv", "dbias")


def assert_gradients_close(actual: Gradients, case: AttentionCase, d_out: np.ndarray, *, calibrated: bool = True,
                           expected: Gradients | None = None, with_dbias: bool = True) -> None:
    """The gradient tolerance rule: ``actual`` (NumPy ``Gradients``) matches the float64 oracle's gradients
    for the cotangent ``d_out`` within ``attention_ref.gradient_tolerance`` (calibrated for other
    people's kernels, the default), exactly 0 where SPEC.md fixes them, never NaN. dbias is compared
    when the case has a bias and ``with_dbias``."""
    __tracebackhide__ = True
    expected = case.oracle_gradients(d_out) if expected is None else expected
    if not with_dbias:
        expected = expected._replace(dbias=None)
    bounds = case.gradient_bounds(d_out, expected, calibrated=calibrated)
    zeros = case.structural_zero_gradients()
    for name in _GRADIENT_NAMES:
        want = getattr(expected, name)
        if want is None:
            continue
        got = getattr(actual, name)
        assert got is not None, f"{name} missing (the case has a bias)\n  case: {case!r}"
        assert_within(name, got, want, getattr(bounds, name), case, exact=getattr(zeros, name),
                      derivation=bounds.derivation)


def assert_same_gradients(first: Gradients, second: Gradients, bound: GradientBounds, case: AttentionCase,
                          what: str) -> None:
    __tracebackhide__ = True
    for name in _GRADIENT_NAMES:
        a, b = getattr(first, name), getattr(second, name)
        if a is not None and b is not None:
            assert_within(f"{what}: {name}", a, b, getattr(bound, name), case, derivation=bound.derivation)


@attention_property("gradients_match_float64_oracle", (7, 13, 14), cases={}, extra=(_seeds,), requires=("grad",))
def gradients_match_float64_oracle(impl: Any, example: tuple[AttentionCase, int]) -> None:
    """dq, dk, dv and dbias match the float64 oracle's analytic backward pass within the gradient
    tolerance (every feature, every dtype); exactly 0 where SPEC.md fixes them; never NaN."""
    case, seed = example
    d_out = random_cotangent(case, seed)
    assert_gradients_close(call_vjp(impl, case, d_out), case, d_out,
                           calibrated=bool(getattr(impl, "calibrated_tolerance", False)),
                           with_dbias="dbias" in getattr(impl, "features", ALL_FEATURES))


@attention_property("gradients_vanish_through_excluded_keys", (8, 14),
                    cases=dict(mask=True, fully_masked_rows=True), extra=(_seeds,), requires=("grad", "mask"))
def gradients_vanish_through_excluded_keys(impl: Any, example: tuple[AttentionCase, int]) -> None:
    """Keys no query attends get dk = dv = 0 exactly, fully excluded rows dq = 0 exactly, excluded
    bias entries dbias = 0 exactly; nothing is NaN (masks with fully masked rows and hidden keys)."""
    case, seed = example
    rng = np.random.default_rng(seed)
    mask = _broadcast_full(case.mask, case.logits_shape, True, bool)
    mask[..., rng.random(case.kv_len) < 0.4] = False
    case = case.replace(mask=mask)
    d_out = random_cotangent(case, seed)
    grads = call_vjp(impl, case, d_out)
    zeros = case.structural_zero_gradients()
    for name in _GRADIENT_NAMES:
        got, fixed = getattr(grads, name), getattr(zeros, name)
        if fixed is None or got is None:  # no bias, or a kernel without dbias
            continue
        got = np.asarray(got, np.float64)
        assert not np.isnan(got).any(), f"{name} has NaN at {np.argwhere(np.isnan(got))[:3].tolist()}\n  case: {case!r}"
        assert_within(f"{name} where SPEC.md fixes 0", np.where(fixed, got, 0.0), np.zeros(got.shape), 0.0, case,
                      exact=np.ones(got.shape, bool))


@attention_property("logit_gradient_rows_sum_to_zero", (5, 14), cases=dict(bias=True), extra=(_seeds,),
                    requires=("grad", "bias", "dbias"))
def logit_gradient_rows_sum_to_zero(impl: Any, example: tuple[AttentionCase, int]) -> None:
    """With a bias of the full logits shape, dbias (the logits' gradient) sums to 0 over the keys of
    every row (softmax is invariant to a constant per row)."""
    case, seed = example
    case = case.replace(bias=np.ascontiguousarray(np.broadcast_to(case.bias, case.logits_shape)))
    d_out = random_cotangent(case, seed)
    grads = call_vjp(impl, case, d_out)
    bound = gradient_bounds_for(impl, case, d_out).dbias.sum(axis=-1)
    sums = np.asarray(grads.dbias, np.float64).sum(axis=-1)
    assert_within("sum over keys of dbias", sums, np.zeros(sums.shape),
                  bound + case.kv_len * UNIT_ROUNDOFF["float64"] * np.abs(np.asarray(grads.dbias, np.float64)).sum(axis=-1),
                  case)


def _float64_cases(features: Features) -> st.SearchStrategy[Any] | None:
    if "float64" not in features.dtypes:
        return None
    cases = feature_cases(Features(features.supports, ("float64",), features.few_shapes))
    return None if cases is None else st.tuples(cases, _seeds)


def directional_derivatives(impl: Any, case: AttentionCase, seed: int) -> tuple[float, float, float]:
    """``(analytic, finite_difference, tolerance)`` for the derivative of ``sum(out · d_out)`` along a
    random direction of (q, k, v, and the bias when ``impl`` gives dbias), at float64.

    The finite difference is central, at steps h and h/2, Richardson-extrapolated; the tolerance is
    the difference of the two estimates (it bounds the truncation error of the extrapolation), plus
    the rounding of the forward passes (their out bounds weighted by |d_out|) divided by the steps,
    plus the gradients' own bound along the direction.
    """
    rng = np.random.default_rng(seed)
    d_out = random_cotangent(case, seed)
    grads = call_vjp(impl, case, d_out)
    with_dbias = "dbias" in getattr(impl, "features", ALL_FEATURES)
    names = ["q", "k", "v"] + (["bias"] if case.bias is not None and with_dbias else [])
    base = {name: np.asarray(getattr(case, name), np.float64) for name in names}
    direction = {}
    for name, x in base.items():
        finite = np.isfinite(x)
        size = np.abs(np.where(finite, x, 0.0)).max(initial=0.0) or 1.0
        direction[name] = np.where(finite, rng.standard_normal(x.shape) * size, 0.0)
    analytic = sum(float(np.sum(np.asarray(getattr(grads, "d" + name), np.float64) * direction[name])) for name in names)

    def objective(step: float) -> tuple[float, float]:
        """sum(out · d_out) at x + step · direction, and the bound on its rounding error."""
        moved = case.replace(**{name: base[name] + step * direction[name] for name in names})
        out = call(impl, moved).out
        error = float(np.sum(np.abs(d_out) * bounds_for(impl, moved).out))
        return float(np.sum(np.asarray(out, np.float64) * d_out)), error

    # A step that moves the largest logit, and the largest argument of the softcap's tanh, by about
    # 1e-4 (the directions are scaled to the inputs), so that the estimates are in their h² regime.
    attended = case.allowed()
    sizes = [np.abs(np.where(attended, case.logits(), 0.0)).max(initial=0.0)]
    if case.softcap is not None:
        raw = case.replace(softcap=None, bias=None).logits() / case.softcap
        sizes.append(np.abs(np.where(attended, raw, 0.0)).max(initial=0.0))
    step = 1e-4 / max(1.0, *(float(x) for x in sizes))
    estimates, rounding = [], 0.0
    for h in (step, step / 2):
        (plus, e_plus), (minus, e_minus) = objective(h), objective(-h)
        estimates.append((plus - minus) / (2 * h))
        rounding += (e_plus + e_minus) / (2 * h)
    extrapolated = (4 * estimates[1] - estimates[0]) / 3
    gradient_bounds = gradient_bounds_for(impl, case, d_out)
    own = sum(float(np.sum(getattr(gradient_bounds, "d" + name) * np.abs(direction[name]))) for name in names)
    return analytic, extrapolated, abs(estimates[1] - estimates[0]) + 2 * rounding + own


@attention_property("gradients_match_finite_differences", (14,), strategy=_float64_cases, requires=("grad",))
def gradients_match_finite_differences(impl: Any, example: tuple[AttentionCase, int]) -> None:
    """float64 gradients match central finite differences of sum(out · d_out) along a random direction
    of (q, k, v, bias), Richardson-extrapolated, within a tolerance derived from the estimates
    themselves (``directional_derivatives``)."""
    case, seed = example
    analytic, extrapolated, tolerance = directional_derivatives(impl, case, seed)
    assert abs(analytic - extrapolated) <= tolerance, (
        f"directional derivative: gradients give {analytic!r}, finite differences {extrapolated!r}; "
        f"|difference| {abs(analytic - extrapolated):.3g} > tolerance {tolerance:.3g}\n  case: {case!r}")


# ---- rule 12: errors -----------------------------------------------------------------------------------


@attention_property("bad_inputs_raise_the_spec_errors", (6, 10, 12), requires=("spec_errors",))
def bad_inputs_raise_the_spec_errors(impl: Any) -> None:
    """Every bad input of the catalogue raises the spec's error type with the same message as the front door."""
    check_bad_inputs(impl)
