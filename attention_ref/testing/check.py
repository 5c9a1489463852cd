"""Check someone else's attention kernel against SPEC.md with the conformance properties.

``check(fn, framework=..., supports=...)`` wraps ``fn`` in a :class:`KernelImplementation` (the
interface the properties use), runs every property that applies to the features ``fn`` supports,
and returns a :class:`CheckReport`.

The kernel's calling convention: ``fn(q, k, v, **keywords)`` with framework-native arrays, q
``(B, Hq, L, E)``, k ``(B, Hkv, S, E)``, v ``(B, Hkv, S, Ev)`` (``layout="blhd"``: ``(B, L, H, E)``
and an output ``(B, L, Hq, Ev)``), called only with the SPEC.md keywords its ``supports`` names:
``mask``, ``bias``, ``scale``, ``causal`` (and ``alignment`` with ``bottom_right``), ``softcap``,
``window`` (``window=(left, right)``, None for an unbounded side), ``dropout`` (``dropout_p`` and a
boolean keep-mask ``dropout_mask`` broadcastable to ``(B, Hq, L, S)``, True = keep),
``return_weights`` (``weights``) and ``return_lse`` (``lse``). It returns ``out``, or
``(out, weights, lse)`` when a return flag is passed (weights ``(B, Hq, L, S)``, before dropout;
lse ``(B, Hq, L)``, ``(B, L, Hq)`` with ``layout="blhd"``). A declared ``fully_masked`` convention
other than "zero" is checked on out; see ``FULLY_MASKED_EVIDENCE``.

Gradients (``"grad"`` in ``supports``: dq, dk, dv; ``"dbias"``: also the bias's): by default the
checker differentiates ``fn`` itself, the natural way for its framework: ``torch.autograd.grad`` of
out (q, k, v and bias require grad; a custom ``torch.autograd.Function`` inside ``fn`` is used as it
is) and ``jax.vjp`` of ``fn`` (it must be traceable). A kernel whose backward pass is a separate
function (any framework, NumPy included) passes ``backward=``: ``backward(q, k, v, d_out,
**keywords) -> (dq, dk, dv)`` or ``(dq, dk, dv, dbias)`` (with ``"dbias"``) with the forward's
keywords (no return flags) and d_out in out's layout. Gradients are held to the calibrated gradient
rule (``attention_ref.tolerance.gradients``). With a fully-masked convention other than "zero", d_out
is zero on fully excluded rows, so that gradients do not depend on the convention (a NaN fill still
gives NaN gradients: NaN times 0).

Outcomes (``attention_ref.testing.report.Status``): a property FAILs when its assertion does not hold;
it is an ERROR when it could not run: the kernel raised on an input within its declared features
(``KernelError``), its results break the calling convention, or the checker broke (a property asking
for an undeclared feature raises ``UnsupportedFeature``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Unpack

import numpy as np
from hypothesis import HealthCheck
from hypothesis import settings as Settings

from ..features import KERNEL_FEATURES
from ..plan import AttentionKeywords, AttentionOptions
from ..registry import get_backend
from ..result import AttentionOutput, Gradients
from ..tolerance import UNIT_ROUNDOFF, value_size
from .cases import AttentionCase
from .report import PropertyOutcome, Status, failure_outcome, failure_sections, render_table, rules_text, summary_line
from .runner import PROPERTIES, check_property_names, run_property
from .strategies import Features

LAYOUTS = ("bhld", "blhd")
#: What a kernel returns for a fully excluded row: SPEC.md's zeros, NaN, the mean of the row's masked v rows
#: (jax.nn's finite fill), or "skip" to leave those rows out of every comparison.
FULLY_MASKED_CONVENTIONS = ("zero", "nan", "mean_v", "skip")


class UnsupportedFeature(Exception):
    """A property asked a kernel for a feature outside its ``supports`` (a checker bug: reported ERROR)."""


class KernelError(Exception):
    """The kernel (or its backward) raised on an input within its declared features: the property could
    not run (reported ERROR, not FAIL). The message shows the kernel's error and the case."""


class KernelImplementation:
    """A user kernel seen through the implementation interface of the properties.

    ``attention`` takes the spec's arguments, passes the supported ones to the kernel in its layout,
    verifies the kernel's declared fully-masked convention, and returns NumPy results in the spec's
    convention (fully excluded rows: out 0, weights 0, lse -inf) so that every property applies.
    """

    def __init__(self, fn: Callable[..., Any], *, framework: str, features: Features, layout: str = "bhld",
                 fully_masked: str = "zero", name: str | None = None, device: str | None = None,
                 backward: Callable[..., Any] | None = None) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if fully_masked not in FULLY_MASKED_CONVENTIONS:
            raise ValueError(f"fully_masked must be one of {FULLY_MASKED_CONVENTIONS}, got {fully_masked!r}")
        self.fn, self.features, self.layout, self.fully_masked = fn, features, layout, fully_masked
        self.backend, self.framework, self.device = get_backend(framework), framework, device
        if "grad" in features and backward is None and framework not in ("torch", "jax"):
            raise ValueError(f"a {framework} kernel that supports 'grad' needs backward= (no autodiff for {framework})")
        self.backward = backward
        self.name: str = name or getattr(fn, "__name__", None) or repr(fn)
        #: Declared conventions that were exercised and verified, with a count (reset per property).
        self.observed: Counter[str] = Counter()

    def asarray(self, x: np.ndarray) -> Any:
        """The NumPy array as an array of the kernel's framework, on ``device`` (default: the
        framework's default device)."""
        array = self.backend.asarray(x)
        if self.device is None:
            return array
        if self.framework == "torch":
            return array.to(self.device)
        if self.framework == "jax":
            import jax

            with jax.enable_x64(x.dtype == np.float64):
                return jax.device_put(array, jax.devices(self.device)[0])
        raise ValueError(f"device {self.device!r} is not available to {self.framework} kernels")

    def to_numpy(self, x: Any) -> np.ndarray:
        return x if isinstance(x, np.ndarray) else self.backend.to_numpy(x)

    def _keywords(self, options: AttentionOptions, return_weights: bool = False,
                  return_lse: bool = False) -> dict[str, Any]:
        """The keywords the kernel is called with: the options it supports and that are set (any other
        set option is a checker bug, UnsupportedFeature), and the return flags it supports."""
        keywords: dict[str, Any] = {}
        used = {"mask": options.mask is not None, "bias": options.bias is not None,
                "scale": options.scale is not None, "causal": options.causal, "softcap": options.softcap is not None,
                "window": options.window is not None, "dropout": options.dropout_mask is not None}
        for feature in (name for name, is_used in used.items() if is_used):
            if feature not in self.features:
                raise UnsupportedFeature(f"{self.name} does not support {feature}")
            if feature == "dropout":
                keywords.update(dropout_p=options.dropout_p, dropout_mask=options.dropout_mask)
            else:
                keywords[feature] = getattr(options, feature)
        positional = options.causal or options.window is not None
        if positional and options.alignment == "bottom_right" and "bottom_right" not in self.features:
            raise UnsupportedFeature(f"{self.name} does not support bottom_right")
        if positional and "bottom_right" in self.features:
            keywords["alignment"] = options.alignment
        if return_weights and "weights" in self.features:
            keywords["return_weights"] = True
        if return_lse and "lse" in self.features:
            keywords["return_lse"] = True
        return keywords

    def _case(self, q: Any, k: Any, v: Any, options: AttentionOptions) -> AttentionCase:
        """The call as an AttentionCase (NumPy arrays), for the report and the fully-masked rows."""
        arrays = {name: None if x is None else self.to_numpy(x) for name, x in options.array_keywords().items()}
        return AttentionCase(*(self.to_numpy(x) for x in (q, k, v)), **{**options.as_keywords(), **arrays})

    def attention(self, q: Any, k: Any, v: Any, *, return_weights: bool = False, return_lse: bool = False,
                  **keywords: Unpack[AttentionKeywords]) -> AttentionOutput:
        """The kernel's results as NumPy arrays in the spec's layout and fully-masked convention."""
        options = AttentionOptions(**keywords)
        kernel_keywords = self._keywords(options, return_weights, return_lse)
        case = self._case(q, k, v, options)
        if self.layout == "blhd":
            q, k, v = (x.swapaxes(1, 2) for x in (q, k, v))
        try:
            result = self.fn(q, k, v, **kernel_keywords)
        except Exception as error:  # a kernel that refuses an input within its declared features: ERROR
            raise KernelError(f"{self.name} raised {type(error).__name__}: {error}\n  case: {case!r}") from error
        if isinstance(result, tuple) and len(result) != 3:
            raise KernelError(f"{self.name} returned a tuple of {len(result)} values; the calling convention is "
                              f"out, or (out, weights, lse) when a return flag is passed\n  case: {case!r}")
        raw_out, raw_weights, raw_lse = result if isinstance(result, tuple) else (result, None, None)
        if raw_out is None:
            raise KernelError(f"{self.name} returned no out\n  case: {case!r}")
        out = self.to_numpy(raw_out)
        weights, lse = (None if x is None else self.to_numpy(x) for x in (raw_weights, raw_lse))
        if self.layout == "blhd":
            out = out.swapaxes(1, 2)
            lse = None if lse is None else lse.swapaxes(1, 2)
        for name, requested, x in (("weights", return_weights, weights), ("lse", return_lse, lse)):
            if requested and name in self.features and x is None:
                raise KernelError(f"{self.name} declares {name!r} but returned None for it with return_{name}=True"
                                  f"\n  case: {case!r}")
        result = AttentionOutput(out, weights, lse)
        _assert_shapes(result, case.output_shapes(), case)
        return self._normalise_fully_masked(case, result)

    def attention_vjp(self, q: Any, k: Any, v: Any, d_out: Any, **keywords: Unpack[AttentionKeywords]) -> Gradients:
        """The kernel's gradients (``backward``, or the framework's autodiff of ``fn``) as NumPy arrays
        in the spec's layout; see the module docstring."""
        if "grad" not in self.features:
            raise UnsupportedFeature(f"{self.name} does not support grad")
        options = AttentionOptions(**keywords)
        kernel_keywords = self._keywords(options)
        case = self._case(q, k, v, options)
        if self.fully_masked != "zero":
            rows = ~case.allowed().any(axis=-1)
            if rows.any():
                zeroed = np.array(self.to_numpy(d_out))
                zeroed[rows] = 0
                d_out = self.asarray(zeroed)
                self.observed[ZEROED_COTANGENT_EVIDENCE] += int(rows.sum())
        if self.layout == "blhd":
            q, k, v, d_out = (x.swapaxes(1, 2) for x in (q, k, v, d_out))
        try:
            grads = tuple(self._gradients(q, k, v, d_out, kernel_keywords))
        except Exception as error:  # a kernel whose backward refuses a supported input: ERROR
            raise KernelError(f"{self.name} backward raised {type(error).__name__}: {error}\n"
                              f"  case: {case!r}") from error
        dq, dk, dv = (self.to_numpy(x) for x in grads[:3])
        if self.layout == "blhd":
            dq, dk, dv = (x.swapaxes(1, 2) for x in (dq, dk, dv))
        dbias = None
        if options.bias is not None and "dbias" in self.features:
            if len(grads) < 4 or grads[3] is None:
                raise KernelError(f"{self.name} declares 'dbias' but its backward gave no bias gradient"
                                  f"\n  case: {case!r}")
            dbias = self.to_numpy(grads[3])
        result = Gradients(dq, dk, dv, dbias)
        _assert_shapes(result, Gradients(case.q.shape, case.k.shape, case.v.shape,
                                         None if options.bias is None else case.bias.shape), case)
        return result

    def _gradients(self, q: Any, k: Any, v: Any, d_out: Any, keywords: dict[str, Any]) -> tuple[Any, ...]:
        """``(dq, dk, dv[, dbias])`` in the kernel's layout."""
        if self.backward is not None:
            return self.backward(q, k, v, d_out, **keywords)
        bias = keywords.pop("bias", None)

        def out_of(result: Any) -> Any:
            return result[0] if isinstance(result, tuple) else result

        if self.framework == "torch":
            import torch

            inputs = [x.detach().requires_grad_() for x in (q, k, v)]
            if bias is not None:
                inputs.append(bias.detach().requires_grad_("dbias" in self.features))
            with torch.enable_grad():
                out = out_of(self.fn(*inputs[:3], **keywords, **({} if bias is None else {"bias": inputs[3]})))
                wanted = [x for x in inputs if x.requires_grad]
                grads = torch.autograd.grad(out, wanted, d_out, allow_unused=True)
            return tuple(torch.zeros_like(x) if g is None else g for x, g in zip(wanted, grads, strict=True))
        import jax

        differentiated_bias = bias if "dbias" in self.features else None

        def forward(q: Any, k: Any, v: Any, traced_bias: Any) -> Any:
            used = traced_bias if differentiated_bias is not None else bias
            return out_of(self.fn(q, k, v, **keywords, **({} if used is None else {"bias": used})))

        with jax.enable_x64(str(q.dtype) == "float64"):
            _, pullback = jax.vjp(forward, q, k, v, differentiated_bias)
            return pullback(d_out)

    def _normalise_fully_masked(self, case: AttentionCase, result: AttentionOutput) -> AttentionOutput:
        """Check the declared convention on fully excluded rows, then put the spec's values there."""
        rows = np.asarray(~case.allowed().any(axis=-1))
        if self.fully_masked == "zero" or not rows.any():
            return result
        out = np.array(result.out)
        if self.fully_masked != "skip":
            got = out[rows].astype(np.float64)
            expected, bound = _fully_masked_expectation(case, self.fully_masked, rows)
            with np.errstate(invalid="ignore"):
                ok = np.isnan(got) == np.isnan(expected)
                ok &= np.isnan(expected) | (np.abs(got - expected) <= bound)
            if not ok.all():
                worst = np.argwhere(~ok)[0]
                raise AssertionError(
                    f"fully excluded rows: the declared convention is {FULLY_MASKED_EVIDENCE[self.fully_masked]}; "
                    f"got {got[tuple(worst)]!r}, expected {expected[tuple(worst)]!r} within {bound[tuple(worst)]:.3g}"
                    f"\n  case: {case!r}")
        self.observed[FULLY_MASKED_EVIDENCE[self.fully_masked]] += int(rows.sum())  # out verified (or skipped)
        out[rows] = 0
        weights, lse = result.weights, result.lse
        if weights is not None:
            weights = np.array(weights)
            weights[rows] = 0
        if lse is not None:
            lse = np.array(lse)
            lse[rows] = -np.inf
        return AttentionOutput(out, weights, lse)


def _assert_shapes(result: AttentionOutput | Gradients, shapes: AttentionOutput | Gradients,
                   case: AttentionCase) -> None:
    """Each returned array has the shape the spec gives it: a wrong shape is the kernel's wrong answer
    (FAIL), reported before any comparison trips over it."""
    for name, x, shape in zip(result._fields, result, shapes, strict=True):
        if x is not None and shape is not None:
            assert x.shape == tuple(shape), f"{name}: shape {x.shape}, expected {tuple(shape)}\n  case: {case!r}"


def _fully_masked_expectation(case: AttentionCase, convention: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(expected, bound)`` for the out of the fully excluded ``rows`` under ``convention``.

    "mean_v" is what a finite mask fill gives (jax.nn, flax, keras): the logits of keys excluded by
    the mask or the causal rule all equal the fill, so the row averages v over those keys; keys
    excluded only by a -inf bias stay -inf, so a row excluded by its bias alone is NaN; with S = 0
    the empty sum gives 0. Its bound: the mean's S-term sum in float32, the rounding of the weight
    1/n and of out to the output dtype, ``(2 u_out + S u_float32) max|v|``.
    """
    _, v = case.repeated_kv()
    v64 = np.asarray(v, np.float64)
    shape = (*case.logits_shape[:-1], case.value_dim)
    if convention == "nan":
        return np.full(shape, np.nan)[rows], np.zeros(shape)[rows]
    filled = ~case.replace(bias=None).allowed()  # excluded by the mask or the causal rule
    counts = filled.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(counts > 0, np.matmul(filled / np.maximum(counts, 1), v64), np.nan if case.kv_len else 0.0)
    size = value_size(v64, filled)
    bound = (2 * UNIT_ROUNDOFF[case.dtype] + case.kv_len * UNIT_ROUNDOFF["float32"]) * size
    return mean[rows], bound[rows]


#: The evidence line of each fully-masked convention, as reports print it (with the number of rows).
#: Only out is verified; the weights and lse of those rows are set to SPEC.md's values unchecked.
FULLY_MASKED_EVIDENCE = {
    "nan": "fully excluded rows: out is NaN (out verified; weights and lse of those rows not compared)",
    "mean_v": "fully excluded rows: out is mean(v) over the row's masked keys, a finite mask fill (NaN when a "
              "-inf bias alone excludes the row; out verified; weights and lse of those rows not compared)",
    "skip": "fully excluded rows: not compared at all (declared skip, NOT verified)",
}


#: The evidence line when gradients were taken with d_out zeroed on fully excluded rows.
ZEROED_COTANGENT_EVIDENCE = ("fully excluded rows: d_out set to 0 there for the gradients (the kernel's "
                             "contribution from those rows is not compared)")


@dataclass
class CheckReport:
    """The outcome of ``check``: per property its status and, for FAIL and ERROR, the shrunk failing case."""

    target: str
    outcomes: list[PropertyOutcome] = field(default_factory=list)
    dtypes: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        """No property failed or errored."""
        return all(o.status.ok for o in self.outcomes)

    def summary(self) -> str:
        return summary_line(o.status for o in self.outcomes)

    def render(self) -> str:
        rows = [(o.name, rules_text(o.rules), o.status) for o in self.outcomes]
        lines = [self.target, *render_table(("property", "rules", "status"), rows)]
        lines += failure_sections(("", o) for o in self.outcomes)
        return "\n".join([*lines, "", self.summary()])

    __str__ = render


def check(
    fn: Callable[..., Any],
    *,
    framework: str,
    supports: Sequence[str] = (),
    layout: str = "bhld",
    dtypes: Sequence[str] = ("float32",),
    fully_masked: str = "zero",
    max_examples: int = 100,
    seed: int | None = None,
    name: str | None = None,
    fail_fast: bool = False,
    device: str | None = None,
    few_shapes: bool = False,
    backward: Callable[..., Any] | None = None,
    properties: Sequence[str] | None = None,
) -> CheckReport:
    """Run every applicable property of SPEC.md against the kernel ``fn`` (see the module docstring
    for its calling convention) and report per property.

    The kernel is held to the calibrated tolerance rule (``attention_ref.tolerance``); ``fully_masked``
    declares its convention for fully excluded rows, which is verified wherever such rows occur, and
    a property that passed only given it reports "convention differs" with the evidence.
    ``device`` ("cuda", "gpu"...) places the inputs (default: the framework's default device).
    ``few_shapes`` draws sizes from a small menu (``strategies.FEW_SHAPES``), for kernels that
    compile once per shape. With ``"grad"`` in ``supports`` the gradients are checked too, through
    ``backward`` or the framework's autodiff (module docstring).
    ``fail_fast`` stops at the first failing property (the rest are reported "not run").
    ``properties`` names the properties to run (default: all); the others are reported "not run"."""
    check_property_names(properties)
    unknown = set(supports) - set(KERNEL_FEATURES)
    if unknown:
        raise ValueError(f"unknown supports {sorted(unknown)}; choose from {', '.join(KERNEL_FEATURES)}")
    features = Features(frozenset(supports), tuple(dtypes), few_shapes=few_shapes)
    impl = KernelImplementation(fn, framework=framework, features=features, layout=layout,
                                fully_masked=fully_masked, name=name, device=device, backward=backward)
    run_settings = Settings(max_examples=max_examples, deadline=None, database=None, print_blob=True,
                            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    report = CheckReport(f"{impl.name} ({framework}, {layout}, supports: {', '.join(supports) or 'none'}, "
                         f"dtypes: {', '.join(dtypes)}, fully masked rows: {fully_masked}, "
                         f"{max_examples} examples, seed {seed})", dtypes=tuple(dtypes))
    for prop in PROPERTIES:
        if (fail_fast and not report.passed) or (properties is not None and prop.name not in properties):
            report.outcomes.append(PropertyOutcome(prop.name, prop.rules, Status.NOT_RUN))
            continue
        if not prop.applies_to(features):
            report.outcomes.append(PropertyOutcome(prop.name, prop.rules, Status.NOT_APPLICABLE))
            continue
        try:
            impl.observed.clear()
            run_property(prop, impl, run_settings, seed=seed, features=features, calibrated=True)
        except Exception as error:  # every failure and error goes in the report
            report.outcomes.append(failure_outcome(prop.name, prop.rules, error))
        else:
            if impl.observed:  # passed given a declared convention, which was exercised and verified
                evidence = "\n".join(f"{what} [{count} rows]" for what, count in impl.observed.items())
                report.outcomes.append(PropertyOutcome(prop.name, prop.rules, Status.CONVENTION_DIFFERS, evidence))
            else:
                report.outcomes.append(PropertyOutcome(prop.name, prop.rules, Status.PASS))
    return report
