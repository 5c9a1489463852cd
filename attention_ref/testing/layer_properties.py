"""The properties ``check_layer`` runs against a layer (:class:`LayerSubject`), the Hypothesis strategy
that draws their calls, and how each call's results are judged.

Shape letters as in ``attention_ref.testing.layer_subjects``. Every comparison is against the float64
oracle (``LayerCase.oracle``: ``ar.multi_head_attention`` in float64) or between two calls of the
layer, within the layer's tolerance rule (``LayerCase.bounds``, ``attention_ref/tolerance/layer.py``)
for a framework layer: the compute dtype of SPEC.md (float32, float64 for float64), intermediates
stored in the input dtype, the per-head attention held to the calibrated rule. Two results that must
be equal are compared within the sum of their bounds.

Declared conventions are verified on every call and reported "convention differs" (with the
evidence) by the property that exercised them:

* fully masked rows (``RawResult.fully_masked``): ``"zero"`` is the reference (o = 0 per head, so out
  = bo) and needs nothing; ``"nan"``: every out row with a fully masked head is NaN (and its weights,
  per head or averaged); ``"mean_v"``: that head contributes the mean of its projected values over
  all keys (a finite mask fill), verified within the rule's bound plus the bound of the same layer at
  scale 0 (uniform weights); ``"skip"``: not verified, and said so. Those rows are then given the
  reference's values so that every other comparison applies;
* returned weights: per head ``(B, H, L, S)`` or head-averaged ``(B, L, S)``, before dropout (P) or
  after (``P * keep / (1 - p)``). The bound of a transformed view is the rule's per-head weight bound
  carried through: times the multiplier, plus the roundings of the product (2 u P') and of the mean
  over H heads ((H + 1) u mean), u the unit roundoff of the returned weights' dtype.

PYTEST_DONT_REWRITE: pytest rewrites the asserts of a plugin's distribution (the ``pytest11``
entry point makes this package one); this module's assertion messages are reported as written.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hypothesis import strategies as st

from ..dropout import dropout_mask
from ..frameworks import numpy_dtype
from ..layers.params import MHAParams
from ..registry import get_backend
from ..tolerance import UNIT_ROUNDOFF
from ..tolerance.layer import LayerErrorBounds
from .layer_cases import LayerCase
from .layer_subjects import LayerCall, LayerError, LayerSubject, ParamDims, RawResult
from .runner import CheckerError
from .strategies import DISTRIBUTIONS, random_values


@dataclass
class LayerTarget:
    """What a layer property receives: the subject, the dtypes it is checked in, and the declared
    conventions exercised (and verified) so far in the property, with a count."""

    subject: LayerSubject
    dtypes: tuple[str, ...] = ("float32",)
    observed: Counter[str] = field(default_factory=Counter)


# ---- drawing calls --------------------------------------------------------------------------------

#: The sizes drawn for a layer that compiles once per shape (``LayerSubject.few_shapes``): batch and
#: lengths from these, so that L = 1, L < S and L > S are all reached with few shapes.
FEW_LAYER_SHAPES = {"batch": (1, 2), "length": (1, 4)}


def _switch(draw: Any, value: bool | None, supported: bool = True) -> bool:
    if not supported:
        return False
    return draw(st.booleans()) if value is None else value


def _params(rng: np.random.Generator, dims: ParamDims, biases: tuple[bool, ...], dtype: str,
            scale: float) -> MHAParams:
    """Weights normal with standard deviation ``scale / sqrt(fan_in)`` (as layers initialise them),
    biases normal with 0.5."""
    d = dims
    shapes = [(d.d_q, d.heads, d.head_dim), (d.d_k, d.kv_heads, d.head_dim), (d.d_v, d.kv_heads, d.value_dim),
              (d.heads, d.value_dim, d.d_out)]
    fan_in = [d.d_q, d.d_k, d.d_v, d.heads * d.value_dim]
    weights = [scale * rng.standard_normal(s) / np.sqrt(n) for s, n in zip(shapes, fan_in, strict=True)]
    bias_shapes = [(d.heads, d.head_dim), (d.kv_heads, d.head_dim), (d.kv_heads, d.value_dim), (d.d_out,)]
    bias_arrays = [0.5 * rng.standard_normal(s) if has else None for s, has in zip(bias_shapes, biases, strict=True)]
    np_dtype = numpy_dtype(dtype)
    return MHAParams(*(None if x is None else x.astype(np_dtype) for x in (*weights, *bias_arrays)))


def identity_params(dims: ParamDims, biases: tuple[bool, ...], dtype: str) -> MHAParams:
    """Identity projections (``d_q = d_k = d_v = H hd = H hd_v = d_out``, Hkv = H): head h of q, k
    and v is features ``h hd .. (h + 1) hd`` of the input, and out concatenates the heads' o; zero
    biases where the layer has biases."""
    d, np_dtype = dims, numpy_dtype(dtype)
    eye = np.eye(d.d_q, dtype=np_dtype)
    wq = eye.reshape(d.d_q, d.heads, d.head_dim)
    wo = eye.reshape(d.heads, d.value_dim, d.d_out)
    zeros = [np.zeros(s, np_dtype) if has else None
             for s, has in zip([(d.heads, d.head_dim)] * 3 + [(d.d_out,)], biases, strict=True)]
    return MHAParams(wq, wq.copy(), wq.copy(), wo, *zeros)


def identity_dims_ok(dims: ParamDims) -> bool:
    return (dims.d_q == dims.d_k == dims.d_v == dims.d_out == dims.heads * dims.head_dim
            == dims.heads * dims.value_dim and dims.kv_heads == dims.heads)


@st.composite
def layer_calls(
    draw: Any,
    target: LayerTarget,
    *,
    mask: bool | None = None,
    key_padding: bool | None = None,
    causal: bool | None = None,
    dropout: bool | None = False,
    gqa: bool | None = None,
    fully_masked_rows: bool | None = None,
    need_weights: bool | None = None,
    own: bool = False,
    identity: bool = False,
    self_attention: bool | None = None,
    max_length: int = 5,
    max_features: int = 8,
) -> LayerCall:
    """A call of the target's layer within its features (a switch set to True that the layer does not
    support is the caller's business: ``layer_strategy`` returns None for it).

    Factories get drawn dims (within ``supports``: by default ``d_k = d_v = d_q = H hd = d_out``,
    ``hd_v = hd``, Hkv = H, all biases or none); instances keep their own dims and biases, and with
    ``own`` their own parameter values. ``identity``: identity projections. Masks are drawn in the
    layer's mask layout (per head unless it takes one mask for every head), with fully masked rows
    forced by ``fully_masked_rows`` (a masked row, or a fully padded batch element); causal is
    top-left; dropout draws a keep-mask ``(B, H, L, S)`` (a layer that draws its own uses the seed).
    ``self_attention``: key and value are the query (True), never (False), or now and then (None,
    when the features agree; always for a layer that takes one input).
    """
    subject = target.subject
    supports = subject.supports
    dtype = draw(st.sampled_from(target.dtypes))
    if subject.dims is not None:
        dims, biases = subject.dims, subject.biases or (False,) * 4
    else:
        kv_heads = draw(st.integers(1, 2 if not identity else 3))
        grouped = _switch(draw, gqa, "gqa" in supports and not identity)
        heads = kv_heads * (draw(st.integers(2, 3)) if grouped else 1)
        head_dim = draw(st.integers(1, 4))
        value_dim = head_dim if identity or "value_head_dim" not in supports else draw(st.integers(1, 4))
        features = st.integers(1, max_features)
        d_q = heads * head_dim if identity or "head_dim" not in supports else draw(features)
        d_k, d_v = (draw(features), draw(features)) if "kv_features" in supports and not identity else (d_q, d_q)
        d_out = heads * value_dim if identity else (draw(features) if "out_features" in supports else d_q)
        dims = ParamDims(d_q, d_k, d_v, d_out, heads, kv_heads, head_dim, value_dim)
        if "partial_biases" in supports:
            biases = tuple(draw(st.lists(st.booleans(), min_size=4, max_size=4)))
        else:
            biases = (draw(st.booleans()),) * 4
    if subject.few_shapes:  # compiled once per shape: a small menu of sizes
        batch = draw(st.sampled_from(FEW_LAYER_SHAPES["batch"]))
        length = draw(st.sampled_from(FEW_LAYER_SHAPES["length"]))
    else:
        batch, length = draw(st.integers(1, 3)), draw(st.integers(1, max_length))
    if self_attention is None:
        self_attention = subject.self_attention_only or ((dims.d_q == dims.d_k == dims.d_v)
                                                         and draw(st.integers(0, 3)) == 0)
    if self_attention:
        keys = length
    else:
        keys = draw(st.sampled_from(FEW_LAYER_SHAPES["length"]) if subject.few_shapes else st.integers(1, max_length))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    distribution = draw(st.sampled_from(DISTRIBUTIONS))
    magnitude = draw(st.sampled_from((0.3, 1.0, 3.0)))
    np_dtype = numpy_dtype(dtype)

    def values(shape: tuple[int, ...]) -> np.ndarray:
        return random_values(rng, shape, distribution, magnitude).astype(np_dtype)

    query = values((batch, length, dims.d_q))
    key, value = (query, query) if self_attention else (values((batch, keys, dims.d_k)),
                                                        values((batch, keys, dims.d_v)))
    if identity:
        params = identity_params(dims, biases, dtype)
    elif own:
        own_params = subject.own_params(dtype)
        if own_params is None:
            raise CheckerError("own=True for a factory, which has no parameters of its own")
        params = own_params
    else:
        params = _params(rng, dims, biases, dtype, draw(st.sampled_from((0.5, 1.0, 2.0))))

    heads = dims.heads
    options: dict[str, Any] = {}
    forced = _switch(draw, fully_masked_rows)
    use_mask = _switch(draw, mask, "mask" in supports)
    use_padding = _switch(draw, key_padding, "key_padding_mask" in supports)
    if use_mask:
        shape = (draw(st.sampled_from((batch, 1))), draw(st.sampled_from((heads, 1))) if subject.mask_per_head else 1,
                 length, keys)
        options["mask"] = rng.random(shape) < draw(st.sampled_from((0.5, 0.8, 0.95)))
        if forced and not use_padding:
            options["mask"][..., rng.integers(length), :] = False
    padding = None
    if use_padding:
        padding = rng.random((batch, keys)) < draw(st.sampled_from((0.5, 0.8, 0.95)))
        if forced:
            padding[rng.integers(batch)] = False
    if _switch(draw, causal, "causal" in supports):
        options["causal"] = True
    if _switch(draw, dropout, "dropout" in supports):
        p = subject.dropout_p if subject.dropout_p is not None else draw(st.sampled_from((0.1, 0.5)))
        options.update(dropout_p=p, dropout_mask=dropout_mask((batch, heads, length, keys), p,
                                                              draw(st.integers(0, 2**32 - 1))))
    case = LayerCase(query=query, key=key, value=value, params=params, key_padding_mask=padding, **options)
    wants_weights = _switch(draw, need_weights, "weights" in supports)
    return LayerCall(case, self_attention=self_attention, need_weights=wants_weights,
                     dropout_seed=draw(st.integers(0, 2**31 - 1)))


# ---- judging a call ---------------------------------------------------------------------------------


def layer_bounds(case: LayerCase) -> LayerErrorBounds:
    """The tolerance a framework layer is held to on ``case``: the layer rule with SPEC.md's compute
    dtype, intermediates (projected q, k, v and o) stored in the input dtype, the calibrated rule for
    the per-head attention."""
    return case.bounds(intermediate_dtype=case.dtype, calibrated=True)


@dataclass(frozen=True)
class Judged:
    """A call's results after the declared fully-masked convention was verified (those rows then hold
    the reference's values): out ``(B, L, d_out)`` and weights in the layer's view (or None), the
    case the oracle is taken on (with the keep-mask the layer used), its bounds and the raw result."""

    out: np.ndarray
    weights: np.ndarray | None
    case: LayerCase
    bounds: LayerErrorBounds
    raw: RawResult


def _where(raw: RawResult) -> str:
    return f" ({raw.path})" if raw.path else ""


def assert_layer_close(what: str, actual: np.ndarray, expected: np.ndarray, bound: np.ndarray, call: LayerCall,
                       derivation: str = "") -> None:
    """``|actual - expected| <= bound`` elementwise (NaN never passes), else AssertionError with the
    worst element and the call."""
    __tracebackhide__ = True
    actual = np.asarray(actual)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, expected {expected.shape}\n  call: {call!r}"
    a64, e64 = actual.astype(np.float64), np.asarray(expected, np.float64)
    bound = np.broadcast_to(np.asarray(bound, np.float64), e64.shape)
    with np.errstate(invalid="ignore"):
        error = np.where(a64 == e64, 0.0, np.abs(a64 - e64))
    bad = np.isnan(error) | (error > bound)
    if not bad.any():
        return
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(bad, np.nan_to_num(error / bound, nan=np.inf, posinf=np.inf), -1.0)
    worst = np.unravel_index(np.argmax(ratio), e64.shape)
    raise AssertionError(
        f"{what}: {int(bad.sum())} of {bad.size} elements wrong; worst at {tuple(int(i) for i in worst)}: "
        f"got {a64[worst]!r}, expected {e64[worst]!r} (error {error[worst]:.3g}, bound {bound[worst]:.3g}"
        f"{'; ' + derivation if derivation else ''})\n  call: {call!r}")


def _unit(weights: np.ndarray) -> float:
    name = np.dtype(weights.dtype).name
    return UNIT_ROUNDOFF.get(name, UNIT_ROUNDOFF["float32"])


def weights_view(view: str, dropout: str, case: LayerCase, per_head: np.ndarray, bound: np.ndarray,
                 unit: float) -> tuple[np.ndarray, np.ndarray]:
    """The expected weights in a layer's declared ``view`` ("per_head" or "averaged") and ``dropout``
    ("before" or "after"), from the per-head weights before dropout and their bound, and the bound of
    that view (module docstring); ``unit`` is the unit roundoff of the returned weights' dtype."""
    expected, limit = np.asarray(per_head, np.float64), np.asarray(bound, np.float64)
    if dropout == "after" and case.dropout_mask is not None:
        multiplier = np.broadcast_to(case.attention_case().dropout_multiplier(), expected.shape)
        expected = expected * multiplier
        limit = limit * multiplier + 2 * unit * expected
    if view == "averaged":
        heads = expected.shape[1]
        expected = expected.mean(axis=1)
        limit = limit.mean(axis=1) + (heads + 1) * unit * expected
    return expected, limit


def _declared_view(subject: LayerSubject, case: LayerCase, per_head: np.ndarray, bound: np.ndarray,
                   unit: float) -> tuple[np.ndarray, np.ndarray]:
    return weights_view(subject.weights_view, subject.weights_dropout, case, per_head, bound, unit)


def judge(target: LayerTarget, call: LayerCall, *, converted: bool = False) -> Judged:
    """Run the call, check out's dtype and shape and the weights' shape (a wrong one FAILs), verify the
    declared fully-masked convention and give those rows the reference's values (module docstring)."""
    __tracebackhide__ = True
    subject = target.subject
    raw = subject.run(call, converted=converted)
    case = call.case
    if raw.dropout_mask is not None and raw.dropout_mask is not case.dropout_mask:
        case = case.replace(dropout_mask=raw.dropout_mask)
    oracle, bounds = case.oracle(), layer_bounds(case)
    assert raw.out.shape == oracle.out.shape, (f"out: shape {raw.out.shape}, expected {oracle.out.shape} "
                                               f"(B, L, d_out)\n  call: {call!r}")
    assert raw.out.dtype == case.query.dtype, (f"out: dtype {raw.out.dtype}, expected the input dtype "
                                               f"{case.query.dtype}\n  call: {call!r}")
    batch, heads, length, keys = oracle.weights.shape
    if raw.weights is not None:
        shape = (batch, heads, length, keys) if subject.weights_view == "per_head" else (batch, length, keys)
        assert raw.weights.shape == shape, (
            f"weights: shape {raw.weights.shape}, expected {shape} (declared {subject.weights_view})\n  call: {call!r}")
    allowed = np.broadcast_to(case.attention_case().allowed(), oracle.weights.shape)
    head_rows: np.ndarray = ~np.any(allowed, axis=-1)  # (B, H, L): fully masked rows of a head
    rows: np.ndarray = np.any(head_rows, axis=1)  # (B, L): out rows with a fully masked head
    convention = raw.fully_masked
    if convention == "zero" or not rows.any():
        return Judged(raw.out, raw.weights, case, bounds, raw)
    out = np.array(raw.out)
    weights = None if raw.weights is None else np.array(raw.weights)
    where = _where(raw)
    if convention == "nan":
        got = out[rows].astype(np.float64)
        assert np.isnan(got).all(), (
            f"fully masked rows{where}: the declared convention is NaN; got {got[~np.isnan(got)][0]!r} in a row with a "
            f"fully masked head\n  call: {call!r}")
        if weights is not None:
            nan_rows = head_rows if subject.weights_view == "per_head" else rows
            seen = weights[nan_rows].astype(np.float64)
            assert np.isnan(seen).all(), (f"fully masked rows{where}: the declared convention is NaN, so their "
                                          f"weights are NaN; got {seen[~np.isnan(seen)][0]!r}\n  call: {call!r}")
        target.observed[f"fully masked rows{where}: NaN in every out row with a fully masked head (and in its "
                        f"weights when returned), verified"] += int(rows.sum())
    elif convention == "mean_v":
        expected, bound = _mean_v_out(case, head_rows, bounds)
        assert_layer_close(f"fully masked rows{where} (declared mean_v: the head's mean projected value)",
                           out[rows], expected[rows], bound[rows], call)
        target.observed[f"fully masked rows{where}: a fully masked head gives the mean of its projected values "
                        f"(a finite mask fill), verified; its weights not compared"] += int(rows.sum())
    else:
        target.observed[f"fully masked rows{where}: not compared (declared skip, NOT verified)"] += int(rows.sum())
    out[rows] = oracle.out[rows].astype(out.dtype)  # the reference's values, so that every other check applies
    if weights is not None:
        expected_weights, _ = _declared_view(subject, case, oracle.weights, bounds.weights, _unit(weights))
        mask = head_rows if subject.weights_view == "per_head" else rows
        weights[mask] = expected_weights[mask].astype(weights.dtype)
    return Judged(out, weights, case, bounds, raw)


def _mean_v_out(case: LayerCase, head_rows: np.ndarray, bounds: LayerErrorBounds) -> tuple[np.ndarray, np.ndarray]:
    """out with each fully masked head row's o replaced by the mean of that head's projected values
    over all keys, and its bound: the case's plus that of the same layer at scale 0 (uniform weights)."""
    attention = case.attention_case()
    o = np.array(attention.oracle().out, np.float64)
    _, v = attention.repeated_kv()
    mean = np.broadcast_to(np.asarray(v, np.float64).mean(axis=-2, keepdims=True), o.shape)
    o[head_rows] = mean[head_rows]
    p = case.params64()
    out = np.einsum("...hlv,hvo->...lo", o, p.wo) + (0.0 if p.bo is None else p.bo)
    uniform = LayerCase(query=case.query, key=case.key, value=case.value, params=case.params, scale=0.0)
    return out, bounds.out + layer_bounds(uniform).out


def compare_to_oracle(target: LayerTarget, judged: Judged, call: LayerCall, what: str = "") -> None:
    """out (and the weights, in the declared view) against the float64 oracle within the bounds;
    records the evidence of a weights view other than the reference's."""
    __tracebackhide__ = True
    oracle = judged.case.oracle()
    label = f"{what}: " if what else ""
    assert_layer_close(f"{label}out", judged.out, oracle.out, judged.bounds.out, call, judged.bounds.derivation)
    if judged.weights is not None:
        expected, bound = _declared_view(target.subject, judged.case, oracle.weights, judged.bounds.weights,
                                       _unit(judged.weights))
        assert_layer_close(f"{label}weights ({target.subject.weights_view}, {target.subject.weights_dropout} dropout)",
                           judged.weights, expected, bound, call)
        record_weights_evidence(target, judged)


def record_weights_evidence(target: LayerTarget, judged: Judged) -> None:
    subject = target.subject
    rows = int(np.prod(judged.case.query.shape[:2]))  # (B, L) query rows
    if subject.weights_view == "averaged":
        target.observed["weights: averaged over the heads (B, L, S), not per head, verified"] += rows
    if subject.weights_dropout == "after" and judged.case.dropout_mask is not None and judged.case.dropout_p > 0:
        target.observed["weights: after dropout (P * keep / (1 - p)), not before, verified"] += rows


def compare_calls(target: LayerTarget, first: Judged, second: Judged, call: LayerCall, what: str) -> None:
    """Two calls the spec says are equal: within the sum of their bounds."""
    __tracebackhide__ = True
    bound = first.bounds + second.bounds
    assert_layer_close(f"{what}: out", first.out, second.out, bound.out, call, bound.derivation)
    if first.weights is not None and second.weights is not None:
        _, b1 = _declared_view(target.subject, first.case, first.case.oracle().weights, first.bounds.weights,
                             _unit(first.weights))
        _, b2 = _declared_view(target.subject, second.case, second.case.oracle().weights, second.bounds.weights,
                             _unit(second.weights))
        assert_layer_close(f"{what}: weights", first.weights, second.weights, b1 + b2, call)
        record_weights_evidence(target, first)


# ---- the registry ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerProperty:
    """One layer property: ``check(target, call)`` for calls drawn from ``build(target)`` (None: the
    property does not apply to this layer)."""

    name: str
    rules: tuple[int, ...]
    description: str
    requires: frozenset[str]
    build: Callable[[LayerTarget], st.SearchStrategy[Any] | None]
    check: Callable[[LayerTarget, Any], None]
    instances_only: bool = False

    def strategy(self, target: LayerTarget) -> st.SearchStrategy[Any] | None:
        return self.build(target)

    def applies_to(self, target: LayerTarget) -> bool:
        subject = target.subject
        if not self.requires <= subject.supports or (self.instances_only and not subject.is_instance):
            return False
        return self.strategy(target) is not None


#: Every layer property, in this order.
LAYER_PROPERTIES: list[LayerProperty] = []


LayerCheck = Callable[[LayerTarget, Any], None]


def layer_property(name: str, rules: tuple[int, ...], *, requires: tuple[str, ...] = (), instances_only: bool = False,
                   strategy: Callable[[LayerTarget], st.SearchStrategy[Any] | None] | None = None,
                   **switches: Any) -> Callable[[LayerCheck], LayerCheck]:
    """Register ``check``; its docstring's first line is the description. Calls are
    ``layer_calls(target, **switches)`` unless ``strategy`` is given."""

    def build(target: LayerTarget) -> st.SearchStrategy[Any] | None:
        return strategy(target) if strategy is not None else layer_calls(target, **switches)

    def register(check: LayerCheck) -> LayerCheck:
        description = (check.__doc__ or name).strip().splitlines()[0]
        LAYER_PROPERTIES.append(LayerProperty(name, rules, description, frozenset(requires), build, check,
                                              instances_only))
        return check

    return register


def get_layer_property(name: str) -> LayerProperty:
    for prop in LAYER_PROPERTIES:
        if prop.name == name:
            return prop
    raise KeyError(name)


# ---- the properties --------------------------------------------------------------------------------


def _reference_calls(target: LayerTarget) -> st.SearchStrategy[LayerCall]:
    return layer_calls(target, own=target.subject.is_instance)


@layer_property("layer_matches_reference", (15, 16, 17), strategy=_reference_calls)
def layer_matches_reference(target: LayerTarget, call: LayerCall) -> None:
    """The layer equals ar.multi_head_attention with the same params (float64 oracle, layer rule),
    with masks, key padding and causal as supported."""
    compare_to_oracle(target, judge(target, call), call)


def _identity_calls(target: LayerTarget) -> st.SearchStrategy[LayerCall] | None:
    dims = target.subject.dims
    if dims is not None and not identity_dims_ok(dims):
        return None
    return layer_calls(target, identity=True)


@layer_property("identity_projections_equal_attention", (15,), strategy=_identity_calls)
def identity_projections_equal_attention(target: LayerTarget, call: LayerCall) -> None:
    """With identity projections (one head, or H heads of consecutive features) the layer is plain
    ar.attention on the inputs split into heads."""
    judged = judge(target, call)
    case = judged.case
    batch, length, features = case.query.shape
    heads = case.params.wq.shape[1]

    def split(x: np.ndarray) -> np.ndarray:
        return np.asarray(x, np.float64).reshape(batch, x.shape[1], heads, features // heads).transpose(0, 2, 1, 3)

    numpy = get_backend("numpy")
    o = numpy.attention(split(case.query), split(case.key), split(case.value), mask=case.combined_mask(),
                        causal=case.causal, dropout_p=case.dropout_p, dropout_mask=case.dropout_mask, dense=True)
    expected = o.transpose(0, 2, 1, 3).reshape(batch, length, features)
    assert_layer_close("out (identity projections) vs ar.attention on the inputs split into heads", judged.out,
                       expected, judged.bounds.out, call, judged.bounds.derivation)


def _repeated(params: MHAParams) -> MHAParams:
    """The kv projections repeated to one per query head, in repeat_interleave order (rule 2)."""
    group = params.wq.shape[1] // params.wk.shape[1]
    return params._replace(wk=np.repeat(params.wk, group, axis=1), wv=np.repeat(params.wv, group, axis=1),
                           bk=None if params.bk is None else np.repeat(params.bk, group, axis=0),
                           bv=None if params.bv is None else np.repeat(params.bv, group, axis=0))


def _gqa_calls(target: LayerTarget) -> st.SearchStrategy[LayerCall] | None:
    dims = target.subject.dims
    if dims is not None:
        return layer_calls(target) if dims.kv_heads < dims.heads else None
    return layer_calls(target, gqa=True) if "gqa" in target.subject.supports else None


@layer_property("gqa_equals_repeated_kv_heads", (2, 15), strategy=_gqa_calls)
def gqa_equals_repeated_kv_heads(target: LayerTarget, call: LayerCall) -> None:
    """Hkv < H equals MHA with each kv projection repeated H/Hkv times (repeat_interleave order): the
    float64 MHA oracle, and the layer itself with the repeated params (factories)."""
    judged = judge(target, call)
    repeated = LayerCall(judged.case.replace(params=_repeated(judged.case.params)), call.self_attention,
                         call.need_weights, call.dropout_seed)
    mha = repeated.case.oracle()
    assert_layer_close("out (GQA) vs the MHA oracle with repeated kv heads", judged.out, mha.out, judged.bounds.out,
                       call, judged.bounds.derivation)
    if not target.subject.is_instance:
        other = judge(target, repeated)
        assert_layer_close("out (MHA with repeated kv heads) vs the MHA oracle", other.out, mha.out, other.bounds.out,
                           repeated, other.bounds.derivation)


def _padding_calls(target: LayerTarget) -> st.SearchStrategy[LayerCall] | None:
    return layer_calls(target, key_padding=True, mask=False, own=target.subject.is_instance)


@layer_property("key_padding_equals_mask", (16,), requires=("mask", "key_padding_mask"), strategy=_padding_calls)
def key_padding_equals_mask(target: LayerTarget, call: LayerCall) -> None:
    """A key padding mask (B, S) equals the mask (B, 1, L, S) it stands for."""
    padding = call.case.key_padding_mask
    assert padding is not None
    length = call.case.query.shape[1]
    mask = np.repeat(padding[:, None, None, :], length, axis=2)
    as_mask = LayerCall(call.case.replace(key_padding_mask=None, mask=mask), call.self_attention, call.need_weights,
                        call.dropout_seed)
    compare_calls(target, judge(target, call), judge(target, as_mask), call, "key_padding_mask vs the equal mask")


def _ignored_key_calls(target: LayerTarget) -> st.SearchStrategy[Any] | None:
    subject = target.subject
    if not {"mask", "key_padding_mask"} & subject.supports or subject.self_attention_only:
        return None
    return st.tuples(layer_calls(target, own=subject.is_instance, self_attention=False,
                                 mask=True if "key_padding_mask" not in subject.supports else None,
                                 key_padding=True if "key_padding_mask" in subject.supports else None),
                     st.integers(0, 2**32 - 1))


@layer_property("ignored_keys_change_nothing", (8, 16), strategy=_ignored_key_calls)
def ignored_keys_change_nothing(target: LayerTarget, example: tuple[LayerCall, int]) -> None:
    """New key and value rows where no query attends (masked or padded for every query and head)
    change nothing, bit for bit: a correct layer gives such keys weight exactly 0."""
    call, seed = example
    first = judge(target, call)
    case = first.case
    allowed = np.broadcast_to(case.attention_case().allowed(), case.oracle().weights.shape)
    ignored = ~np.any(allowed, axis=(1, 2))  # (B, S): keys no query of any head attends
    rng = np.random.default_rng(seed)
    key, value = np.array(case.key), np.array(case.value)
    key[ignored] = random_values(rng, key[ignored].shape, "normal", 5.0).astype(key.dtype)
    value[ignored] = random_values(rng, value[ignored].shape, "normal", 5.0).astype(value.dtype)
    changed = LayerCall(call.case.replace(key=key, value=value), call.self_attention, call.need_weights,
                        call.dropout_seed)
    second = judge(target, changed)
    where = f"{int(ignored.sum())} ignored keys (B, S) {np.argwhere(ignored).tolist()} given new key and value rows"
    for name, a, b in (("out", first.out, second.out), ("weights", first.weights, second.weights)):
        if a is None or b is None:
            continue
        same = np.array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))
        if not same:
            worst = np.unravel_index(np.argmax(np.nan_to_num(np.abs(np.asarray(a, np.float64) - b), nan=np.inf)),
                                     a.shape)
            raise AssertionError(f"{name} changed when {where}: at {tuple(int(i) for i in worst)} {a[worst]!r} became "
                                 f"{b[worst]!r} (must be bit for bit the same)\n  call: {call!r}")


def _round_trip_calls(target: LayerTarget) -> st.SearchStrategy[LayerCall] | None:
    return layer_calls(target, own=True) if target.subject.converts else None


@layer_property("converters_round_trip", (15,), instances_only=True, strategy=_round_trip_calls)
def converters_round_trip(target: LayerTarget, call: LayerCall) -> None:
    """framework layer -> MHAParams -> framework layer: the same params bit for bit, and the same out."""
    own, again = target.subject.round_trip_params(call.dtype)
    for name, a, b in zip(MHAParams._fields, own, again, strict=True):
        same = (a is None and b is None) or (a is not None and b is not None and a.dtype == b.dtype
                                             and a.shape == b.shape and np.array_equal(a, b))
        assert same, (f"params.{name}: from_X(to_X(params)) differs from params ({None if a is None else a.shape} "
                      f"{None if a is None else a.dtype} vs {None if b is None else b.shape} "
                      f"{None if b is None else b.dtype})\n  call: {call!r}")
    compare_calls(target, judge(target, call), judge(target, call, converted=True), call,
                  "the layer vs the layer rebuilt from its params")


def _weights_calls(target: LayerTarget) -> st.SearchStrategy[LayerCall] | None:
    return layer_calls(target, need_weights=True, dropout=None)


@layer_property("weights_follow_declared_convention", (11, 13, 15), requires=("weights",), strategy=_weights_calls)
def weights_follow_declared_convention(target: LayerTarget, call: LayerCall) -> None:
    """The returned weights are per head or head-averaged, before or after dropout, as declared."""
    judged = judge(target, call)
    if judged.weights is None:
        raise LayerError(f"the layer declares weights but returned none\n  call: {call!r}")
    compare_to_oracle(target, judged, call)


def _dropout_calls(target: LayerTarget) -> st.SearchStrategy[LayerCall] | None:
    return layer_calls(target, dropout=True)


@layer_property("dropout_matches_explicit_mask", (13, 15), requires=("dropout",), strategy=_dropout_calls)
def dropout_matches_explicit_mask(target: LayerTarget, call: LayerCall) -> None:
    """With dropout, out equals the reference with the same keep-mask (weights * keep / (1 - p))."""
    compare_to_oracle(target, judge(target, call), call, "with dropout")


def _fully_masked_calls(target: LayerTarget) -> st.SearchStrategy[LayerCall] | None:
    supports = target.subject.supports
    if not {"mask", "key_padding_mask"} & supports:
        return None
    return layer_calls(target, fully_masked_rows=True, own=target.subject.is_instance,
                       mask=True if "key_padding_mask" not in supports else None,
                       key_padding=True if "mask" not in supports else None)


@layer_property("fully_masked_rows_follow_declared_convention", (8, 16), strategy=_fully_masked_calls)
def fully_masked_rows_follow_declared_convention(target: LayerTarget, call: LayerCall) -> None:
    """A query row whose keys are all masked or padded gives the declared convention (zero: out = bo)."""
    compare_to_oracle(target, judge(target, call), call)
