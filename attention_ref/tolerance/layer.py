"""The tolerance rule of the multi-head attention layer (SPEC.md rule 17, "Accuracy"): how far the
layer's out may lie from the exact answer. It extends the attention rule (``forward``) through the
projections by the same first-order forward error analysis. ``LayerCase.bounds`` in
``attention_ref.testing.layer_cases`` assembles it for one call, and every layer comparison asks it
for its bounds.

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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .forward import SMALLEST_NORMAL, UNIT_ROUNDOFF


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
