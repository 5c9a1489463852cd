"""Finite differences of attention (rule 14): directional derivatives of ``sum(out · d_out)``, to
check float64 gradients independently of any backward pass, with a tolerance derived from the
estimates themselves."""

from __future__ import annotations

import numpy as np

from .assertions import bounds_for, gradient_bounds_for
from .cases import AttentionCase, call, call_vjp, random_cotangent
from .implementation import Subject


def _directions(case: AttentionCase, names: list[str], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A random direction per input, scaled to the input's largest finite entry (0 on non-finite ones)."""
    direction = {}
    for name in names:
        x = np.asarray(getattr(case, name), np.float64)
        finite = np.isfinite(x)
        size = np.abs(np.where(finite, x, 0.0)).max(initial=0.0) or 1.0
        direction[name] = np.where(finite, rng.standard_normal(x.shape) * size, 0.0)
    return direction


def _step(case: AttentionCase) -> float:
    """A step that moves the largest logit, and the largest argument of the softcap's tanh, by about
    1e-4 (the directions are scaled to the inputs), so that the estimates are in their h² regime."""
    attended = case.allowed()
    sizes = [np.abs(np.where(attended, case.logits(), 0.0)).max(initial=0.0)]
    if case.softcap is not None:
        raw = case.replace(softcap=None, bias=None).logits() / case.softcap
        sizes.append(np.abs(np.where(attended, raw, 0.0)).max(initial=0.0))
    return 1e-4 / max(1.0, *(float(x) for x in sizes))


def directional_derivatives(subject: Subject, case: AttentionCase, seed: int) -> tuple[float, float, float]:
    """``(analytic, finite_difference, tolerance)`` for the derivative of ``sum(out · d_out)`` along a
    random direction of (q, k, v, and the bias when the subject gives dbias), at float64.

    The finite difference is central, at steps h and h/2, Richardson-extrapolated; the tolerance is
    the difference of the two estimates (it bounds the truncation error of the extrapolation), plus
    the rounding of the forward passes (their out bounds weighted by |d_out|) divided by the steps,
    plus the gradients' own bound along the direction.
    """
    rng = np.random.default_rng(seed)
    d_out = random_cotangent(case, seed)
    grads = call_vjp(subject.impl, case, d_out)
    with_dbias = "dbias" in subject.features
    names = ["q", "k", "v"] + (["bias"] if case.bias is not None and with_dbias else [])
    base = {name: np.asarray(getattr(case, name), np.float64) for name in names}
    direction = _directions(case, names, rng)
    analytic = sum(float(np.sum(np.asarray(getattr(grads, "d" + name), np.float64) * direction[name]))
                   for name in names)

    def objective(step: float) -> tuple[float, float]:
        """sum(out · d_out) at x + step · direction, and the bound on its rounding error."""
        moved = case.replace(**{name: base[name] + step * direction[name] for name in names})
        out = call(subject.impl, moved).out
        error = float(np.sum(np.abs(d_out) * bounds_for(subject, moved).out))
        return float(np.sum(np.asarray(out, np.float64) * d_out)), error

    step = _step(case)
    estimates, rounding = [], 0.0
    for h in (step, step / 2):
        (plus, e_plus), (minus, e_minus) = objective(h), objective(-h)
        estimates.append((plus - minus) / (2 * h))
        rounding += (e_plus + e_minus) / (2 * h)
    extrapolated = (4 * estimates[1] - estimates[0]) / 3
    gradient_bounds = gradient_bounds_for(subject, case, d_out)
    own = sum(float(np.sum(getattr(gradient_bounds, "d" + name) * np.abs(direction[name]))) for name in names)
    return analytic, extrapolated, abs(estimates[1] - estimates[0]) + 2 * rounding + own
