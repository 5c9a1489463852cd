"""The tolerance rule of the multi-head attention layer (SPEC.md rule 17, "Accuracy"): how far the
layer's out may lie from the exact answer. It extends the attention rule (``forward``) through the
projections by the same first-order forward error analysis. ``LayerCase.bounds`` (and
``layer_error_bounds``) in ``attention_ref.testing.layer_cases`` assemble it for one call, and every
layer comparison asks them for its bounds.

With ``u`` the unit roundoff of the compute dtype, ``u_s`` that of the dtype the projected q, k, v
and the per-head o are *stored* in (the compute dtype for SPEC.md's layer, whose only rounding is out's;
the input dtype for a framework layer that rounds them, ``intermediate_dtype``), and ``|.|`` taken
elementwise, on the float64 oracle's values:

* projections ``y = x·W + b`` (n = d_in terms): ``|Δy| <= (n + 1) u (|x|·|W| + |b|) + u_s |y|``;
* the per-head attention on perturbed q, k, v: the attention rule (``error_bounds``, or the
  calibrated rule for a framework layer) with the logit perturbation
  ``|scale| max_j sum_e (|Δq_e| |k_je| + |q_e| |Δk_je| + |Δq_e| |Δk_je|)`` over the attended keys j
  as its ``extra_logit_error``, plus the value perturbation ``m max_j |Δv_jc|`` (m the largest
  dropout multiplier; the weights of a row sum to 1), o stored in the storage dtype;
* out ``= o·Wo + bo`` (n = H hd_v terms):
  ``|Δout| <= |Δo|·|Wo| + (n + 1) u (|o|·|Wo| + |bo|) + u_out |out| + tiny_out``.

The float64 oracle's own error is added by running the same formulas with ``u`` raised by the
float64 unit roundoff. Worst-case sums, never a fudge factor.

**The calibrated rule, for other people's layers** (``calibrated_out_bound``). The worst-case sums
grow with the widths: at d = 512 the derived bound is several times |out|, too loose to catch a
wrong scale. Other people's layers are therefore held, as FlashAttention's and PyTorch's own tests
hold kernels, to at most ``factor`` (2, 3 with a softcap: ``BASELINE_FACTOR``) times the error of a
reference implementation in the same precision, plus one rounding of what feeds each element:
``factor * (e_base + u_out * size)``, with ``e_base`` the largest error over the whole out of
SPEC.md's own layer (the NumPy backend) against the float64 oracle, and ``size`` what feeds the
element in absolute values through the chain, ``(|P Z| · (|value|·|Wv| + |bv|)) · |Wo| + |bo|``
(``out_size``; a sum that cancels does not shrink it).
Where that exceeds the derived bound, the derived bound applies. This is the rule for float32
intermediates. For half-precision ones (float16, bfloat16), whose roundings dominate, it is the
derived bound with the calibrated attention rule inside (``calibrated_error_bounds``), which only
loosens it; for float64 ones it is the derived bound (SPEC.md's float64 layer is the oracle itself,
so its error calibrates nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .forward import BASELINE_FACTOR, BASELINE_FACTOR_SOFTCAP, SMALLEST_NORMAL, UNIT_ROUNDOFF


@dataclass(frozen=True)
class LayerErrorBounds:
    """Per-element absolute bounds: out ``(*B, L, d_out)`` and per-head weights ``(*B, H, L, S)``."""

    out: np.ndarray
    weights: np.ndarray
    derivation: str = "derived first-order layer bound (attention_ref/tolerance/layer.py)"

    def __mul__(self, factor: float) -> LayerErrorBounds:
        return LayerErrorBounds(self.out * factor, self.weights * factor, f"{factor:g} × [{self.derivation}]")

    __rmul__ = __mul__

    def __add__(self, other: LayerErrorBounds) -> LayerErrorBounds:
        """The bound on a difference of two results, each within its own bound."""
        return LayerErrorBounds(self.out + other.out, self.weights + other.weights,
                                f"[{self.derivation}] + [{other.derivation}]")


def _u(compute_dtype: str) -> float:
    return UNIT_ROUNDOFF[compute_dtype] + UNIT_ROUNDOFF["float64"]  # the oracle's own error included


def projection_bound(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, y: np.ndarray, *, compute_dtype: str,
                     storage_dtype: str) -> np.ndarray:
    """Bound on ``|Δy|`` for ``y = einsum("...ld,dhk->...hlk", x, w) + b`` (float64 arrays: x
    ``(*B, L, d)``, w ``(d, H, k)``, b ``(H, k)`` or None, y the exact result ``(*B, H, L, k)``)."""
    size = np.einsum("...ld,dhk->...hlk", np.abs(x), np.abs(w))
    if b is not None:
        size = size + np.abs(b)[:, None, :]
    terms = x.shape[-1] + 1
    return terms * _u(compute_dtype) * size + UNIT_ROUNDOFF[storage_dtype] * np.abs(y)


def logit_perturbation(q: np.ndarray, k: np.ndarray, dq: np.ndarray, dk: np.ndarray, *, scale: float,
                       allowed: np.ndarray) -> np.ndarray:
    """Per row ``(*B, H, L)``: the largest change of an attended logit when q ``(*B, H, L, hd)`` and
    k ``(*B, H, S, hd)`` (kv heads repeated) move by at most dq and dk elementwise."""
    aq, ak = np.abs(q), np.abs(k)
    change = abs(scale) * (np.matmul(dq, np.swapaxes(ak, -1, -2)) + np.matmul(aq, np.swapaxes(dk, -1, -2))
                           + np.matmul(dq, np.swapaxes(dk, -1, -2)))
    return np.where(np.broadcast_to(allowed, change.shape), change, 0.0).max(axis=-1, initial=0.0)


def value_perturbation(dv: np.ndarray, *, allowed: np.ndarray, dropout_multiplier: np.ndarray | float) -> np.ndarray:
    """``(*B, H, L, hd_v)``: the change of o when v ``(*B, H, S, hd_v)`` (kv heads repeated) moves by
    at most dv: ``m max_j |Δv_jc|`` over the attended keys j, m the row's largest multiplier."""
    allowed = np.asarray(allowed, bool)
    rows = np.where(allowed[..., None], dv[..., None, :, :], 0.0).max(axis=-2, initial=0.0)
    multiplier = np.broadcast_to(np.asarray(dropout_multiplier, np.float64), allowed.shape)
    return rows * multiplier.max(axis=-1, initial=1.0)[..., None]


def output_bound(o: np.ndarray, o_bound: np.ndarray, wo: np.ndarray, bo: np.ndarray | None, out: np.ndarray, *,
                 compute_dtype: str, out_dtype: str) -> np.ndarray:
    """Bound on ``|Δout|`` for ``out = einsum("...hlv,hvo->...lo", o, wo) + bo`` (float64: o exact,
    ``o_bound`` its bound, out exact), computed in compute_dtype and rounded to out_dtype."""
    size = np.einsum("...hlv,hvo->...lo", np.abs(o), np.abs(wo))
    if bo is not None:
        size = size + np.abs(bo)
    terms = wo.shape[0] * wo.shape[1] + 1
    propagated = np.einsum("...hlv,hvo->...lo", o_bound, np.abs(wo))
    return (propagated + terms * _u(compute_dtype) * size + UNIT_ROUNDOFF[out_dtype] * np.abs(out)
            + SMALLEST_NORMAL[out_dtype])


def out_size(weights: np.ndarray, dropout_multiplier: np.ndarray | float, value: np.ndarray, wv: np.ndarray,
             bv: np.ndarray | None, wo: np.ndarray, bo: np.ndarray | None) -> np.ndarray:
    """``(*B, L, d_out)``: what feeds each element of out, in absolute values through the whole chain,
    ``(|P Z| · (|value|·|Wv| + |bv|)) · |Wo| + |bo|`` (P the weights ``(*B, H, L, S)``, Z the dropout
    multiplier, kv heads repeated), so that cancellation in any sum does not shrink it."""
    v_size = np.einsum("...sd,dhk->...hsk", np.abs(value), np.abs(wv))
    if bv is not None:
        v_size = v_size + np.abs(bv)[:, None, :]
    v_size = np.repeat(v_size, wo.shape[0] // wv.shape[1], axis=-3)
    o_size = np.matmul(np.abs(weights * np.asarray(dropout_multiplier, np.float64)), v_size)
    size = np.einsum("...hlv,hvo->...lo", o_size, np.abs(wo))
    return size if bo is None else size + np.abs(bo)


def calibrated_out_bound(derived: np.ndarray, reference_out: np.ndarray, exact_out: np.ndarray, size: np.ndarray,
                         *, out_dtype: str, softcap: float | None) -> np.ndarray:
    """The calibrated rule (module docstring) for out: per element, the smaller of the ``derived``
    bound and ``factor * (e_base + u_out * size)``, where ``e_base`` is the largest error of
    ``reference_out`` (SPEC.md's layer in the same dtype) against ``exact_out`` over the finite
    elements, and ``size`` is ``out_size``. Elements where either is not finite keep the derived
    bound."""
    reference = np.asarray(reference_out, np.float64)
    finite = np.isfinite(reference) & np.isfinite(exact_out)
    e_base = float(np.max(np.abs(reference - exact_out), where=finite, initial=0.0))
    factor = BASELINE_FACTOR if softcap is None else BASELINE_FACTOR_SOFTCAP
    calibrated = factor * (e_base + UNIT_ROUNDOFF[out_dtype] * size + SMALLEST_NORMAL[out_dtype])
    return np.where(finite, np.minimum(derived, calibrated), derived)
