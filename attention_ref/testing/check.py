"""Check someone else's attention kernel against SPEC.md with the conformance properties.

``check(fn, framework=..., supports=...)`` wraps ``fn`` in a :class:`KernelImplementation` (the
interface the properties use), runs every property that applies to the features ``fn`` supports,
and returns a :class:`CheckReport`.

The kernel (a function, a torch ``nn.Module`` instance or class, a flax nnx or linen module or a keras
layer: ``attention_ref.testing.targets``) is called as ``fn(q, k, v, **keywords)``, q, k and v
positional, with framework-native arrays, q ``(B, Hq, L, E)``, k ``(B, Hkv, S, E)``, v
``(B, Hkv, S, Ev)`` (``layout="blhd"``: ``(B, L, H, E)`` and an output ``(B, L, Hq, Ev)``), and
only with the SPEC.md keywords its ``supports`` names: ``mask``, ``bias``, ``scale``, ``causal``
(and ``alignment`` with ``bottom_right``), ``softcap``, ``window`` (``window=(left, right)``, None
for an unbounded side), ``dropout`` (``dropout_p`` and a boolean keep-mask ``dropout_mask``
broadcastable to ``(B, Hq, L, S)``, True = keep), ``return_weights`` (``weights``) and
``return_lse`` (``lse``). The mask is True = may attend, or True = masked out with
``mask_polarity="ignore"`` (the checker passes ``~mask``). It returns ``out``, or
``(out, weights, lse)`` when a return flag is passed (weights ``(B, Hq, L, S)``, before dropout;
lse ``(B, Hq, L)``, ``(B, L, Hq)`` with ``layout="blhd"``); or, declared with ``returns`` (e.g.
``("out", "weights")``), that tuple on every call, and then no return flag is ever passed and the
declared results are checked as ``weights``/``lse`` are. out must have the input dtype (or the wider
dtype a kernel declares with ``out_dtype``: verified, then rounded to the input dtype, reported as
"convention differs") and its shape: otherwise the property FAILs. A declared ``fully_masked``
convention other than "zero" is verified on out (and, for "nan", on the weights the kernel
returns); see ``FULLY_MASKED_EVIDENCE``.

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

PYTEST_DONT_REWRITE: pytest rewrites the asserts of a plugin's distribution (the ``pytest11``
entry point makes this package one); this module's assertion messages are reported as written.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Unpack

import numpy as np
from hypothesis import HealthCheck, Phase
from hypothesis import settings as Settings

from ..features import KERNEL_FEATURES, MASK_POLARITIES, OUT_DTYPES, parse_returns
from ..frameworks import numpy_dtype
from ..plan import AttentionKeywords, AttentionOptions
from ..registry import get_backend
from ..result import AttentionOutput, Gradients
from ..tolerance import UNIT_ROUNDOFF, value_size
from ..varlen import varlen_mask
from .cases import AttentionCase
from .draws import defining_modules
from .outcomes import outcome_of
from .paged_kernels import call_paged, check_paged_supports, dense_through_paged
from .progress import Progress, as_progress
from .report import PropertyOutcome, Status, failure_sections, render_table, rules_text, summary_line
from .report_files import Suite
from .runner import PROPERTIES, check_property_names, check_rule_numbers, run_property, selects
from .strategies import Features
from .targets import as_kernel
from .varlen_kernels import (
    CAUSAL_ALIGNMENTS,
    CONVENTION_EVIDENCE,
    EMPTY_LSE_CONVENTIONS,
    LSE_LAYOUTS,
    BottomRightCall,
    bottom_right_calls,
    call_varlen,
    check_varlen_supports,
    dense_through_varlen,
    packed_lse,
)

LAYOUTS = ("bhld", "blhd")
#: The calling conventions ``check`` knows: dense attention, FlashAttention's packed varlen one, or a
#: paged KV cache read through a block table.
INTERFACES = ("dense", "varlen", "paged", "flex")
#: The features the flex interface adds: FlexAttention's programs (rule 22), as keywords of a dense call.
FLEX_FEATURES = frozenset({"mask_mod", "score_mod"})
#: What a kernel returns for a fully excluded row: SPEC.md's zeros, NaN, the mean of the row's masked v rows
#: (jax.nn's finite fill), or "skip" to leave those rows out of every comparison.
FULLY_MASKED_CONVENTIONS = ("zero", "nan", "mean_v", "skip")


class UnsupportedFeature(Exception):
    """A property asked a kernel for a feature outside its ``supports`` (a checker bug: reported ERROR)."""


class DeclarationBroken(AssertionError):
    """The kernel's result breaks a convention it declared (e.g. ``empty_lse="+inf"`` with a finite lse
    on a row with no key): its wrong answer, reported FAIL."""


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
                 backward: Callable[..., Any] | None = None, returns: Sequence[str] | None = None,
                 mask_polarity: str = "attend", out_dtype: str | None = None) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if fully_masked not in FULLY_MASKED_CONVENTIONS:
            raise ValueError(f"fully_masked must be one of {FULLY_MASKED_CONVENTIONS}, got {fully_masked!r}")
        if mask_polarity not in MASK_POLARITIES:
            raise ValueError(f"mask_polarity must be one of {MASK_POLARITIES}, got {mask_polarity!r}")
        if out_dtype is not None and out_dtype not in OUT_DTYPES:
            raise ValueError(f"out_dtype must be None or one of {OUT_DTYPES}, got {out_dtype!r}")
        self.returns = None if returns is None else parse_returns(tuple(returns))
        if self.returns is not None:
            undeclared = [r for r in ("weights", "lse") if r in features and r not in self.returns]
            if undeclared:
                raise ValueError(f"supports {', '.join(undeclared)} but returns={','.join(self.returns)} does not "
                                 f"include it: with returns, the kernel returns the same results on every call")
        self.fn, self.features, self.layout, self.fully_masked = fn, features, layout, fully_masked
        self.mask_polarity, self.out_dtype = mask_polarity, out_dtype
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
                "window": options.window is not None, "dropout": options.dropout_mask is not None,
                "score_mod": options.score_mod is not None, "mask_mod": options.mask_mod is not None}
        for feature in (name for name, is_used in used.items() if is_used):
            if feature not in self.features:
                raise UnsupportedFeature(f"{self.name} does not support {feature}")
            if feature == "dropout":
                keywords.update(dropout_p=options.dropout_p, dropout_mask=options.dropout_mask)
            elif feature == "mask" and self.mask_polarity == "ignore":
                keywords["mask"] = ~options.mask  # True = masked out
            else:
                keywords[feature] = getattr(options, feature)
        positional = options.causal or options.window is not None
        if positional and options.alignment == "bottom_right" and "bottom_right" not in self.features:
            raise UnsupportedFeature(f"{self.name} does not support bottom_right")
        if positional and "bottom_right" in self.features:
            keywords["alignment"] = options.alignment
        if self.returns is None:  # with returns declared, the kernel takes no return flag
            if return_weights and "weights" in self.features:
                keywords["return_weights"] = True
            if return_lse and "lse" in self.features:
                keywords["return_lse"] = True
        return keywords

    def _out_and_lse(self, result: Any, interface: str, keywords: dict[str, Any], return_lse: bool,
                     where: str) -> Any:
        """A varlen or paged kernel's result, out or ``(out, lse)`` as its convention says (KernelError
        otherwise), as NumPy: out, or ``AttentionOutput(out, None, lse)`` when ``return_lse``."""
        values = tuple(result) if isinstance(result, tuple | list) else (result,)
        if len(values) != (2 if "return_lse" in keywords else 1):
            raise KernelError(f"{self.name} returned {len(values)} values; the {interface} convention is out, or "
                              f"(out, lse) with return_lse\n  call: {where}")
        out = self.to_numpy(values[0])
        if not return_lse:
            return out
        if "lse" not in self.features:
            raise UnsupportedFeature(f"{self.name} does not support lse")
        return AttentionOutput(out, None, self.to_numpy(values[1]))

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
        except DeclarationBroken as error:  # its declared convention does not hold: FAIL
            raise DeclarationBroken(f"{error}\n  case: {case!r}") from None
        except Exception as error:  # a kernel that refuses an input within its declared features: ERROR
            flags = [flag for flag in ("return_weights", "return_lse") if flag in kernel_keywords]
            hint = (f" (it was passed {', '.join(flags)}: a kernel that returns its weights or lse on every call "
                    f"declares returns, e.g. --returns out,weights)" if flags and isinstance(error, TypeError) else "")
            raise KernelError(f"{self.name} raised {type(error).__name__}: {error}{hint}\n  case: {case!r}") from error
        raw = self._unpack(result, case)
        try:
            out = self.to_numpy(raw[0])
            weights, lse = (None if x is None else self.to_numpy(x) for x in raw[1:])
        except Exception as error:  # not arrays of its framework: a calling-convention mismatch (ERROR)
            types = ", ".join(type(x).__name__ for x in raw if x is not None)
            raise KernelError(f"{self.name} returned {types}, not {self.framework} arrays "
                              f"({type(error).__name__}: {error})\n  case: {case!r}") from error
        if self.layout == "blhd":  # (a result of too few dims is left for the shape assertion)
            out = out.swapaxes(1, 2) if out.ndim >= 3 else out
            lse = lse.swapaxes(1, 2) if lse is not None and lse.ndim >= 3 else lse
        for name, requested, x in (("weights", return_weights, weights), ("lse", return_lse, lse)):
            declared = name in self.features or (self.returns is not None and name in self.returns)
            if x is None and declared and (requested or self.returns is not None):
                raise KernelError(f"{self.name} declares {name!r} but returned None for it"
                                  f"{'' if self.returns is not None else f' with return_{name}=True'}"
                                  f"\n  case: {case!r}")
        checked = AttentionOutput(out, weights, lse)
        _assert_shapes(checked, case.output_shapes(), case)
        out = self._checked_out_dtype(out, case)
        # What was not asked for is dropped, as SPEC.md's attention returns None for it (rule 11).
        return self._normalise_fully_masked(case, AttentionOutput(out, weights if return_weights else None,
                                                                  lse if return_lse else None))

    def _unpack(self, result: Any, case: AttentionCase) -> tuple[Any, Any, Any]:
        """``(out, weights, lse)`` (None for what is not returned) from the kernel's result, or KernelError
        when it breaks the calling convention (the declared ``returns``, or out / (out, weights, lse))."""
        if self.returns is not None:
            values = tuple(result) if isinstance(result, tuple | list) else (result,)
            if len(values) != len(self.returns):
                raise KernelError(f"{self.name} returned {len(values)} value{'s' if len(values) != 1 else ''}; it "
                                  f"declares returns={','.join(self.returns)} ({len(self.returns)}) on every call"
                                  f"\n  case: {case!r}")
            got = dict(zip(self.returns, values, strict=True))
            raw = (got["out"], got.get("weights"), got.get("lse"))
        elif isinstance(result, tuple):
            if len(result) != 3:
                raise KernelError(
                    f"{self.name} returned a tuple of {len(result)} values; the calling convention is out, or "
                    f"(out, weights, lse) when a return flag is passed (a kernel that always returns, say, "
                    f"(out, weights) declares returns=('out', 'weights'), --returns out,weights)\n  case: {case!r}")
            raw = tuple(result)
        else:
            raw = (result, None, None)
        if raw[0] is None:
            raise KernelError(f"{self.name} returned no out\n  case: {case!r}")
        return raw[0], raw[1], raw[2]

    def expected_out_dtype(self, dtype: str) -> str:
        """The dtype out must have for inputs of ``dtype``: the input dtype (rule 10), or the declared
        ``out_dtype`` when it is wider."""
        if self.out_dtype is not None and numpy_dtype(self.out_dtype).itemsize > numpy_dtype(dtype).itemsize:
            return self.out_dtype
        return dtype

    def _checked_out_dtype(self, out: np.ndarray, case: AttentionCase) -> np.ndarray:
        """out in the input dtype. A wrong dtype is the kernel's wrong answer (FAIL); a declared wider
        ``out_dtype`` is verified, recorded as evidence and rounded (to nearest even) to the input dtype,
        what SPEC.md returns."""
        expected = self.expected_out_dtype(case.dtype)
        if out.dtype != numpy_dtype(expected):
            if expected != case.dtype:
                why = f"the declared out_dtype for {case.dtype} inputs"
            elif out.dtype.kind == "f" and out.dtype.itemsize > numpy_dtype(expected).itemsize:
                why = "the input dtype, rule 10; a kernel that returns a wider out on purpose declares out_dtype"
            else:
                why = "the input dtype, rule 10"
            raise AssertionError(f"out: dtype {out.dtype}, expected {expected} ({why})\n  case: {case!r}")
        if expected == case.dtype:
            return out
        self.observed[f"out returned in {expected} for {case.dtype} inputs (declared out_dtype; verified, then "
                      f"rounded to {case.dtype} for the comparisons)"] += int(np.prod(out.shape[:-1]))
        return out.astype(numpy_dtype(case.dtype))

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
            return result[0] if isinstance(result, tuple | list) else result

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
            if self.fully_masked == "nan" and case.kv_len == 0:  # no keys: a naive kernel's empty sum is 0
                ok = np.isnan(got) | (got == 0)
            if not ok.all():
                worst = np.argwhere(~ok)[0]
                raise AssertionError(
                    f"fully excluded rows: the declared convention is {FULLY_MASKED_EVIDENCE[self.fully_masked]}; "
                    f"got {got[tuple(worst)]!r}, expected {expected[tuple(worst)]!r} within {bound[tuple(worst)]:.3g}"
                    f"\n  case: {case!r}")
        self.observed[FULLY_MASKED_EVIDENCE[self.fully_masked]] += int(rows.sum())  # out verified (or skipped)
        out[rows] = 0
        weights, lse = result.weights, result.lse
        if self.fully_masked == "nan" and weights is not None and case.kv_len > 0:
            not_nan = ~np.isnan(np.asarray(weights[rows], np.float64))
            if not_nan.any():
                worst = tuple(np.argwhere(not_nan)[0])
                raise AssertionError(f"fully excluded rows: the declared convention is NaN, so their weights are "
                                     f"NaN; got {weights[rows][worst]!r} at {worst}\n  case: {case!r}")
            self.observed[NAN_WEIGHTS_EVIDENCE] += int(rows.sum())
        if weights is not None:
            weights = np.array(weights)
            weights[rows] = 0
        if lse is not None:
            lse = np.array(lse)
            lse[rows] = -np.inf
        return AttentionOutput(out, weights, lse)


class VarlenKernelImplementation(KernelImplementation):
    """A kernel with the packed variable-length interface (``varlen_kernels``): ``attention`` runs it
    on a packed batch of equal segments (every dense property applies), ``varlen_attention`` on a
    packed problem as ``Backend.varlen_attention`` takes it (the varlen properties).

    Its declared conventions (``empty_lse``, ``lse_layout``, ``causal_alignment``: ``varlen_kernels``)
    are converted to SPEC.md's on every call, after being verified where they apply: a result that
    breaks its declaration is a FAIL (``DeclarationBroken``), and a pass that used one reports
    "convention differs" with ``CONVENTION_EVIDENCE``."""

    def __init__(self, fn: Callable[..., Any], *, empty_lse: str = "-inf", lse_layout: str = "packed",
                 causal_alignment: str | None = None, **options: Any) -> None:
        super().__init__(fn, **options)
        for name, value, choices in (("empty_lse", empty_lse, EMPTY_LSE_CONVENTIONS),
                                     ("lse_layout", lse_layout, LSE_LAYOUTS),
                                     ("causal_alignment", causal_alignment, CAUSAL_ALIGNMENTS)):
            if value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
        self.empty_lse, self.lse_layout, self.causal_alignment = empty_lse, lse_layout, causal_alignment
        self.varlen_fn = fn
        self.fn = dense_through_varlen(self._conventional, self.backend)

    def _conventional(self, q: Any, k: Any, v: Any, cu_seqlens_q: Any, cu_seqlens_k: Any, *, max_seqlen_q: int,
                      max_seqlen_k: int, **keywords: Any) -> Any:
        """The kernel on a packed problem in SPEC.md's conventions: out, or ``(out, lse)`` with lse
        ``(Hq, total_q)`` and -inf for rows with no key (NumPy when a declared convention was applied)."""
        cu_q, cu_k = (x if isinstance(x, np.ndarray) else self.to_numpy(x) for x in (cu_seqlens_q, cu_seqlens_k))
        cu_q, cu_k = cu_q.astype(np.int64), cu_k.astype(np.int64)
        total_q, total_k = int(q.shape[0]), int(k.shape[0])
        alignment = keywords.get("alignment", "top_left")
        direct = BottomRightCall(np.arange(total_q), cu_q, np.arange(total_k), cu_k, {}, np.arange(total_q))
        calls = [direct]
        if self.causal_alignment == "bottom_right":
            keywords.pop("alignment", None)
            positional = keywords.get("causal", False) or keywords.get("window") is not None
            if positional and alignment == "top_left" and np.any(np.diff(cu_q) != np.diff(cu_k)):
                calls = bottom_right_calls(cu_q, cu_k, total_q, total_k, keywords.get("causal", False),
                                           keywords.get("window"), "window" in self.features)
                self.observed[CONVENTION_EVIDENCE["bottom_right"]] += int(cu_q[-1])
            alignment = "bottom_right"
        plain = calls[0] is direct and self.empty_lse == "-inf" and self.lse_layout == "packed"
        results = []
        for call in calls:
            taken = [x if call is direct else _take_rows(self.backend, x, index)
                     for x, index in ((q, call.q_index), (k, call.k_index), (v, call.k_index))]
            result = call_varlen(self.varlen_fn, self.backend, taken[0], taken[1], taken[2], call.cu_seqlens_q,
                                 call.cu_seqlens_k, {**keywords, **call.keywords})
            values = tuple(result) if isinstance(result, tuple | list) else (result,)
            if plain or len(values) != (2 if "return_lse" in keywords else 1):
                return result  # SPEC.md's conventions, or a result the caller reports as breaking the interface
            results.append((call, self.to_numpy(values[0]),
                            self._spec_lse(self.to_numpy(values[1]), call, {**keywords, **call.keywords}, alignment,
                                           int(taken[0].shape[0]), int(taken[1].shape[0]))
                            if len(values) == 2 else None))
        if calls[0] is direct:
            _, out, lse = results[0]
            return (out, lse) if lse is not None else out
        first = results[0][1]
        out = np.zeros((total_q, *first.shape[1:]), first.dtype)
        lse_all = None if results[0][2] is None else np.zeros((results[0][2].shape[0], total_q), results[0][2].dtype)
        for call, part, part_lse in results:
            keep = call.rows >= 0
            out[call.rows[keep]] = part[keep]
            if lse_all is not None and part_lse is not None:
                lse_all[:, call.rows[keep]] = part_lse[:, keep]
        return (out, lse_all) if lse_all is not None else out

    def _spec_lse(self, lse: np.ndarray, call: BottomRightCall, keywords: dict[str, Any], alignment: str,
                  total_q: int, total_k: int) -> np.ndarray:
        """lse ``(Hq, total_q)`` with -inf for rows with no key, from the declared layout and empty-row value
        (verified: ``DeclarationBroken`` otherwise)."""
        cu_q = call.cu_seqlens_q
        if self.lse_layout == "padded":
            try:
                lse = packed_lse(lse, cu_q, total_q)
            except AssertionError as error:
                raise DeclarationBroken(str(error)) from None
            self.observed[CONVENTION_EVIDENCE["padded"]] += int(cu_q[-1])
        if self.empty_lse == "+inf":
            allowed = varlen_mask(cu_q, call.cu_seqlens_k, total_q=total_q, total_k=total_k,
                                  causal=keywords.get("causal", False), alignment=alignment,
                                  window=keywords.get("window"))
            empty = np.asarray(~allowed.any(axis=1), dtype=bool)
            if self.lse_layout == "padded":
                empty[int(cu_q[-1]):] = False  # no lse in that layout
            got = lse[:, empty] if lse.ndim == 2 and lse.shape[-1] == total_q else None
            if got is not None and got.size:
                wrong = ~np.isposinf(got.astype(np.float64))
                if wrong.any():
                    head, token = (int(i) for i in np.argwhere(wrong)[0])
                    raise DeclarationBroken(
                        f"lse of rows with no key to attend: the declared convention is +inf (empty_lse='+inf'); "
                        f"got {got[head, token]!r} at head {head}, token {int(np.flatnonzero(empty)[token])} "
                        f"(cu_seqlens_q {cu_q.tolist()}, cu_seqlens_k {call.cu_seqlens_k.tolist()})")
                lse = np.array(lse)
                lse[:, empty] = -np.inf
                self.observed[CONVENTION_EVIDENCE["+inf"]] += int(empty.sum())
        return lse

    def varlen_attention(self, q: Any, k: Any, v: Any, cu_seqlens_q: Any, cu_seqlens_k: Any, *,
                         seqused_k: Any = None, scale: float | None = None, causal: bool = False,
                         alignment: str = "top_left", softcap: float | None = None,
                         window: tuple[int | None, int | None] | None = None, return_lse: bool = False) -> Any:
        """The kernel's results on a packed problem, as NumPy arrays (out, or ``AttentionOutput(out,
        None, lse)`` with ``return_lse``). ``seqused_k`` is applied by passing the kernel only the keys
        used (the others are attended by nothing, so the problem is the same)."""
        cu_q, cu_k = (x if isinstance(x, np.ndarray) else np.asarray(x if isinstance(x, list) else self.to_numpy(x))
                      for x in (cu_seqlens_q, cu_seqlens_k))
        if seqused_k is not None:  # the same problem without the unused keys (attended by nothing): exact
            used = np.asarray(seqused_k if isinstance(seqused_k, np.ndarray | list) else self.to_numpy(seqused_k))
            keep = np.concatenate([np.arange(start, start + n) for start, n in zip(cu_k[:-1], used, strict=True)]
                                  + [np.zeros(0, np.int64)]).astype(np.int64)
            k, v = k[self.backend.asarray_like(keep, k)], v[self.backend.asarray_like(keep, v)]
            cu_k = np.concatenate([[0], np.cumsum(used)]).astype(np.int64)
        options = AttentionOptions(scale=scale, causal=causal, alignment=alignment, softcap=softcap, window=window)
        keywords = self._keywords(options, return_lse=return_lse)
        where = (f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, cu_seqlens_q {cu_q.tolist()}, "
                 f"cu_seqlens_k {cu_k.tolist()}, {keywords}")
        try:
            result = call_varlen(self._conventional, self.backend, q, k, v, cu_q, cu_k, keywords)
        except DeclarationBroken as error:  # the kernel's wrong answer: FAIL
            raise DeclarationBroken(f"{error}\n  call: {where}") from None
        except Exception as error:  # a kernel that refuses an input within its declared features: ERROR
            raise KernelError(f"{self.name} raised {type(error).__name__}: {error}\n  call: {where}") from error
        return self._out_and_lse(result, "varlen", keywords, return_lse, where)


def _take_rows(backend: Any, x: Any, index: np.ndarray) -> Any:
    """``x[index]`` along the first axis (any framework)."""
    return x[backend.asarray_like(np.asarray(index, np.int64), x)] if backend.framework == "torch" else x[index]


class PagedKernelImplementation(KernelImplementation):
    """A kernel with the paged KV-cache interface (``paged_kernels``): ``attention`` runs it on a batch
    of sequences whose caches are a dense case's keys in pages (every dense property applies),
    ``paged_attention`` on a paged problem as ``attention_ref.paged.paged_attention`` takes it (the
    paged properties)."""

    def __init__(self, fn: Callable[..., Any], **options: Any) -> None:
        super().__init__(fn, **options)
        self.paged_fn = fn
        self.fn = dense_through_paged(fn, self.backend, window="window" in self.features)

    def paged_attention(self, q: Any, k_cache: Any, v_cache: Any, block_table: Any, cache_seqlens: Any, *,
                        cu_seqlens_q: Any = None, scale: float | None = None, causal: bool = False,
                        softcap: float | None = None, window: tuple[int | None, int | None] | None = None,
                        return_lse: bool = False) -> Any:
        """The kernel's results on a paged problem, as NumPy arrays (out, or ``AttentionOutput(out,
        None, lse)`` with ``return_lse``)."""
        arrays = [None if x is None else x if isinstance(x, np.ndarray) else
                  np.asarray(x if isinstance(x, list) else self.to_numpy(x))
                  for x in (block_table, cache_seqlens, cu_seqlens_q)]
        table, lengths, cu_q = arrays
        assert table is not None and lengths is not None
        options = AttentionOptions(scale=scale, causal=causal, alignment="bottom_right", softcap=softcap,
                                   window=window)
        keywords = self._keywords(options, return_lse=return_lse)
        keywords.pop("alignment", None)  # the paged interface is bottom-right, without the keyword
        where = (f"q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}, block_table "
                 f"{table.tolist()}, cache_seqlens {lengths.tolist()}, cu_seqlens_q "
                 f"{None if cu_q is None else cu_q.tolist()}, {keywords}")
        try:
            result = call_paged(self.paged_fn, self.backend, q, k_cache, v_cache, table, lengths, cu_q, keywords)
        except Exception as error:  # a kernel that refuses an input within its declared features: ERROR
            raise KernelError(f"{self.name} raised {type(error).__name__}: {error}\n  call: {where}") from error
        return self._out_and_lse(result, "paged", keywords, return_lse, where)


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
#: out is verified (and, for "nan", the weights when returned); the rest of those rows is set to SPEC.md's
#: values unchecked.
FULLY_MASKED_EVIDENCE = {
    "nan": "fully excluded rows: out is NaN (with S = 0: NaN or 0, the empty sum; verified; their lse not compared)",
    "mean_v": "fully excluded rows: out is mean(v) over the row's masked keys, a finite mask fill (NaN when a "
              "-inf bias alone excludes the row; out verified; weights and lse of those rows not compared)",
    "skip": "fully excluded rows: not compared at all (declared skip, NOT verified)",
}


#: The evidence line when the weights of fully excluded rows were verified NaN (fully_masked="nan").
NAN_WEIGHTS_EVIDENCE = "fully excluded rows: weights are NaN (verified)"

#: The evidence line when gradients were taken with d_out zeroed on fully excluded rows.
ZEROED_COTANGENT_EVIDENCE = ("fully excluded rows: d_out set to 0 there for the gradients (the kernel's "
                             "contribution from those rows is not compared)")


#: An evidence line of "convention differs": what was declared and exercised, and on how many rows.
_EVIDENCE_COUNT = re.compile(r"(.*) \[(\d+) rows\]")


def _wrapped(text: str) -> list[str]:
    return textwrap.wrap(text, 110, subsequent_indent="  ", break_on_hyphens=False, break_long_words=False)


@dataclass
class CheckReport:
    """The outcome of ``check``: per property its status and, for FAIL and ERROR, the shrunk failing case."""

    target: str
    outcomes: list[PropertyOutcome] = field(default_factory=list)
    dtypes: tuple[str, ...] = ()
    #: The kernel's name (the suite's name in JSON and JUnit; default: ``target``, the header).
    name: str = ""
    seed: int | None = None
    max_examples: int | None = None
    #: Where the inputs were placed (None: the framework's default device) and the run's wall time.
    device: str | None = None
    seconds: float = 0.0

    def suites(self) -> list[Suite]:
        """The report as one suite (``report_files``)."""
        return [Suite(self.name or self.target, self.outcomes, description=self.target,
                      seconds=sum(o.seconds for o in self.outcomes))]

    def document(self) -> dict[str, Any]:
        """The JSON document of this report (``report_files.report_document``)."""
        from .report_files import report_document

        return report_document("check", self.suites(), seed=self.seed, max_examples=self.max_examples,
                               seconds=self.seconds, device=self.device, dtypes=self.dtypes, summary=self.summary())

    @property
    def passed(self) -> bool:
        """No property failed or errored."""
        return all(o.status.ok for o in self.outcomes)

    def summary(self) -> str:
        return summary_line(o.status for o in self.outcomes)

    def render(self) -> str:
        """The table of the properties that ran, the names of those that did not (n/a, not run), the
        detail of each FAIL and ERROR, and the evidence of "convention differs", once for all the
        properties that share it (with the range of rows per property)."""
        rows = [(o.name, rules_text(o.rules), o.status) for o in self.outcomes if o.status.counted]
        lines = [self.target, *render_table(("property", "rules", "status"), rows)]
        not_applicable = [o.name for o in self.outcomes if o.status == Status.NOT_APPLICABLE]
        if not_applicable:
            lines += _wrapped(f"{Status.NOT_APPLICABLE} (a feature they need is not declared): "
                              f"{', '.join(not_applicable)}")
        not_run = sum(o.status == Status.NOT_RUN for o in self.outcomes)
        if not_run:
            lines.append(f"{Status.NOT_RUN}: {not_run} more (not selected, or after a failure with fail_fast)")
        lines += failure_sections(("", o) for o in self.outcomes if o.status != Status.CONVENTION_DIFFERS)
        shared: dict[tuple[str, ...], list[tuple[str, list[int]]]] = {}
        for outcome in self.outcomes:
            if outcome.status == Status.CONVENTION_DIFFERS:
                evidence = [_EVIDENCE_COUNT.fullmatch(line) for line in outcome.detail.splitlines()]
                what = tuple(m.group(1) if m else line for m, line in zip(evidence, outcome.detail.splitlines(),
                                                                          strict=True))
                shared.setdefault(what, []).append((outcome.name, [int(m.group(2)) if m else 0 for m in evidence]))
        for what, found in shared.items():
            names = [name for name, _ in found]
            ran = [o.name for o in self.outcomes if o.status.counted]
            which = (f"{len(names)} propert{'y' if len(names) == 1 else 'ies'}: {', '.join(names)}"
                     if names != ran or len(names) == 1 else f"all {len(names)} properties that ran")
            lines += ["", *_wrapped(f"{Status.CONVENTION_DIFFERS} ({which}):")]
            for i, line in enumerate(what):
                counts = sorted({count[i] for _, count in found})
                span = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"
                lines.append(f"{line} [{span} rows{' per property' if len(names) > 1 else ''}]")
        return "\n".join([*lines, "", self.summary()])

    __str__ = render


def kernel_features(supports: Sequence[str], dtypes: Sequence[str], *, returns: Sequence[str] | None = None,
                    few_shapes: bool = False) -> Features:
    """The features ``check`` draws a kernel's cases within: its ``supports`` (ValueError for a name
    not in ``KERNEL_FEATURES``), the results it declares it ``returns`` beyond out, and ``dtypes``."""
    unknown = set(supports) - set(KERNEL_FEATURES)
    if unknown:
        raise ValueError(f"unknown supports {sorted(unknown)}; choose from {', '.join(KERNEL_FEATURES)}")
    returned = () if returns is None else parse_returns(tuple(returns))
    return Features(frozenset(supports) | {r for r in returned if r != "out"}, tuple(dtypes), few_shapes=few_shapes)


def interface_features(features: Features, interface: str, causal_alignment: str | None = None) -> Features:
    """The features a kernel of ``interface`` is checked with: its own, plus ``varlen`` or ``paged`` (the
    interface's properties), plus ``bottom_right`` for a kernel that always aligns bottom-right (the
    paged interface; a varlen kernel declaring ``causal_alignment``) and takes causal or a window:
    the cases of both alignments reach it, top-left ones as an equal bottom-right problem."""
    if interface == "dense":
        return features
    if interface == "flex":
        return dataclasses.replace(features, supports=features.supports | FLEX_FEATURES)
    positional = {"causal", "window"} & features.supports
    fixed = {"bottom_right"} if positional and (interface == "paged" or causal_alignment) else set()
    return dataclasses.replace(features, supports=features.supports | {interface} | fixed)


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
    returns: Sequence[str] | None = None,
    mask_polarity: str = "attend",
    out_dtype: str | None = None,
    rules: Sequence[int] | None = None,
    progress: Progress | None = None,
    plot_dir: str | Path | None = None,
    interface: str = "dense",
    empty_lse: str = "-inf",
    lse_layout: str = "packed",
    causal_alignment: str | None = None,
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
    ``properties`` names the properties to run and ``rules`` the SPEC.md rules whose properties run
    (default: all; a property must match both); the others are reported "not run".
    ``progress`` receives the run's events (``attention_ref.testing.progress``; default: none).
    ``plot_dir``: a PNG of every FAIL's shrunk case is written there (``attention_ref.testing.pictures``,
    the ``plot`` extra), its path in the outcome's ``picture``.
    ``interface="varlen"``: ``fn`` has FlashAttention's packed variable-length interface
    (``attention_ref.testing.varlen_kernels``): every property runs on it, the dense ones through a
    packed batch of equal segments, and the varlen properties (rule 20) on drawn segmentations.
    A varlen kernel declares its conventions where they differ from SPEC.md's: ``empty_lse="+inf"``
    (lse of a row with no key, FlashAttention 2), ``lse_layout="padded"`` (lse ``(B, Hq,
    max_seqlen_q)``), ``causal_alignment="bottom_right"`` (no alignment keyword, always bottom-right):
    each is verified and converted, and reported as "convention differs" with its evidence
    (``varlen_kernels.CONVENTION_EVIDENCE``). ``interface="paged"``: ``fn`` reads a paged KV cache
    through a block table (``attention_ref.testing.paged_kernels``): every property runs on it, the
    dense ones through a batch of sequences whose caches hold the keys in pages, and the paged
    properties (rule 21) on drawn page tables. ``interface="flex"``: ``fn`` is a dense kernel that takes
    FlexAttention's programs as ``score_mod=`` and ``mask_mod=`` keywords (``supports`` gains
    ``mask_mod`` and ``score_mod``): every property runs on it, and rule 22's with drawn programs
    (``attention_ref.flex``: causal, window, prefix-LM, documents, tables, ALiBi, relative bias, softcap).

    ``fn`` may be a function, a torch ``nn.Module`` (instance or class, called in eval mode), a flax
    nnx or linen module or a keras layer (``attention_ref.testing.targets``; TargetError, a
    TypeError, for anything else). ``returns`` (e.g. ``("out", "weights")``) declares what it returns
    on every call: then no return flag is passed, and the declared results are checked as the
    ``weights`` and ``lse`` features are. ``mask_polarity="ignore"``: its boolean mask is True =
    masked out (it is given ``~mask``). ``out_dtype`` ("float32" or "float64"): out is returned in that
    dtype for narrower inputs on purpose (verified; "convention differs")."""
    check_property_names(properties)
    check_rule_numbers(rules)
    if interface not in INTERFACES:
        raise ValueError(f"interface must be one of {', '.join(INTERFACES)}, got {interface!r}")
    if interface == "varlen":
        check_varlen_supports(tuple(supports))
        if layout != "bhld" or returns is not None:
            raise ValueError("interface='varlen' has its own layout (total, heads, head_dim) and returns (out, or "
                             "(out, lse) with return_lse): layout and returns do not apply")
    declared_varlen = {"empty_lse": empty_lse, "lse_layout": lse_layout, "causal_alignment": causal_alignment}
    if interface != "varlen" and (empty_lse, lse_layout, causal_alignment) != ("-inf", "packed", None):
        raise ValueError("empty_lse, lse_layout and causal_alignment are conventions of interface='varlen'")
    if interface == "paged":
        check_paged_supports(tuple(supports))
        if layout != "bhld" or returns is not None:
            raise ValueError("interface='paged' has its own layout (q in tokens, heads, head_dim; the caches in pages) "
                             "and returns (out, or (out, lse) with return_lse): layout and returns do not apply")
    features = interface_features(kernel_features(supports, dtypes, returns=returns, few_shapes=few_shapes),
                                  interface, causal_alignment)
    returned = () if returns is None else parse_returns(tuple(returns))
    kernel = as_kernel(fn, framework, name)
    implementation = {"dense": KernelImplementation, "varlen": VarlenKernelImplementation,
                      "paged": PagedKernelImplementation, "flex": KernelImplementation}[interface]
    conventions: dict[str, Any] = declared_varlen if interface == "varlen" else {}
    impl = implementation(kernel.fn, framework=framework, features=features, layout=layout,
                          fully_masked=fully_masked, name=kernel.name, device=device, backward=backward,
                          returns=None if returns is None else returned, mask_polarity=mask_polarity,
                          out_dtype=out_dtype, **conventions)
    # No explain phase: it reruns a shrunk failure many times to annotate which parts of it vary, which
    # the report does not show (the shrunk case is the finding).
    run_settings = Settings(max_examples=max_examples, deadline=None, database=None, print_blob=True,
                            phases=[phase for phase in Phase if phase != Phase.explain],
                            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    declared = [f"supports: {', '.join(supports) or 'none'}"]
    if kernel.kind != "function":
        declared.insert(0, kernel.kind)
    if returns is not None:
        declared.append(f"returns: {','.join(returned)}")
    if mask_polarity != "attend":
        declared.append(f"mask: True = {mask_polarity}")
    if out_dtype is not None:
        declared.append(f"out dtype: {out_dtype}")
    if interface != "dense":
        declared.append(f"interface: {interface}")
    declared += [f"{key}: {value}" for key, value in declared_varlen.items()
                 if value != {"empty_lse": "-inf", "lse_layout": "packed", "causal_alignment": None}[key]]
    report = CheckReport(f"{impl.name} ({framework}, {layout}, {', '.join(declared)}, "
                         f"dtypes: {', '.join(dtypes)}, fully masked rows: {fully_masked}, "
                         f"{max_examples} examples, seed {seed})", dtypes=tuple(dtypes), name=impl.name, seed=seed,
                         max_examples=max_examples, device=device)
    began = time.perf_counter()
    shown = as_progress(progress)
    kernel_modules = defining_modules(fn, kernel.fn, backward)  # their literals are drawn (testing/draws.py)
    shown.plan(sum(selects(p.name, p.rules, properties, rules) and p.applies_to(features) for p in PROPERTIES))
    for prop in PROPERTIES:
        if (fail_fast and not report.passed) or not selects(prop.name, prop.rules, properties, rules):
            report.outcomes.append(PropertyOutcome(prop.name, prop.rules, Status.NOT_RUN))
            continue
        if not prop.applies_to(features):
            report.outcomes.append(PropertyOutcome(prop.name, prop.rules, Status.NOT_APPLICABLE))
            continue
        report.outcomes.append(outcome_of(
            prop.name, prop.rules,
            functools.partial(run_property, prop, impl, run_settings, seed=seed, features=features, calibrated=True,
                              on_example=shown.example, local_modules=kernel_modules),
            target=impl.name, progress=shown, observed=impl.observed,
            picture=None if plot_dir is None else failure_picture_maker(impl, plot_dir, prop.name)))
    report.seconds = time.perf_counter() - began
    return report


def failure_picture_maker(impl: Any, plot_dir: str | Path, property_name: str) -> Callable[[BaseException], str | None]:
    """``picture(error)`` for ``outcome_of``: the PNG of a FAIL of ``property_name`` on ``impl`` in
    ``plot_dir``, named ``<target>-<property>.png`` (unsafe characters of the target's name replaced),
    or None when the failure has no attention case to draw."""

    def picture(error: BaseException) -> str | None:
        from .pictures import failure_picture

        path = Path(plot_dir) / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', impl.name)}-{property_name}.png"
        made = failure_picture(impl, error, path, title=f"{property_name} on {impl.name}")
        return None if made is None else str(made)

    return picture
