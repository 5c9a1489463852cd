"""The tolerance rule for gradients (SPEC.md rule 14): how far dq, dk, dv and dbias may lie from the
exact answer. The forward rule is in ``attention_ref.tolerance.forward``; this module extends it with the
same method, and every gradient comparison asks ``gradient_error_bounds`` (ours) or
``calibrated_gradient_bounds`` (other people's kernels) for its bounds.

**Derived bound.** A first-order forward error analysis of the softmax backward pass, evaluated on
the actual data, with ``u`` the unit roundoff of the compute dtype, P the exact weights, Z the dropout
multiplier (1 without dropout), dO the cotangent, and the per-row weight error ``rho`` and logit error
``delta`` of ``attention_ref.tolerance.forward``. Writing ``|x|`` elementwise and ``n u`` for an n-term sum:

* ``dP_err = rho P + tiny`` (each weight), ``(PZ)_err = Z (dP_err + 2 u P)`` (the multiplier and the
  product rounded);
* ``dW = Z (dO Vᵀ)`` with ``dW_err = Z Ev u (|dO| |V|ᵀ) + 2 u |dW|``;
* ``D = rowsum(P dW)`` with ``D_err = rowsum(dP_err |dW| + P dW_err) + S u rowsum(P |dW|)``;
* ``dS = P (dW - D)`` with ``dS_err = dP_err |dW - D| + P (dW_err + D_err + u |dW - D|) + u |dS|``;
* under a softcap c, with ``t = tanh(raw / c)``: ``t_err = (1 - t²) delta / c + (T + 2) u |t|`` and
  ``dR = dS (1 - t²)``, ``dR_err = dS_err (1 - t²) + |dS| (2 |t| t_err + u t²) + 4 u |dR|`` (the
  square, the subtraction, the product, and two more roundings for autodiff's order
  ``((g c)(1 - t²)) / c``; ``dR = dS`` without a cap);
* ``dq = scale dR K``: ``|scale| (dR_err |K| + (S + 1) u |dR| |K|) + (S + 1) tiny``;
* ``dk = scale dRᵀ Q`` and ``dv = (PZ)ᵀ dO``, summed over the G query heads of a kv head (``n = G L``
  terms): ``|scale| (dR_errᵀ |Q| + (n + 1) u |dR|ᵀ |Q|) + (n + 1) tiny`` and
  ``(PZ)_errᵀ |dO| + n u (PZ)ᵀ |dO| + n tiny``;
* ``dbias = dS`` summed over the bias's broadcast dims (``m`` terms per element):
  ``sum(dS_err) + m u sum(|dS|) + m tiny``.

**The FlashAttention-2 backward** (SPEC.md rule 19, after a blocked forward) recomputes P as
``exp(x - lse)`` from the forward's lse and takes ``D = rowsum(dO O)`` from its unrounded out. Its
``dP_err`` uses ``rho_P = expm1(delta + e_lse + u (X + B + |lse|) + T u)`` (the logit error, the lse
error ``e_lse`` of the forward rule, the subtraction, the exp) in place of ``rho``, and
``D_err = sum_c |dO_c| (e_O,c + Ev u |O_c|) + Ev tiny`` (``e_O`` the forward rule's out error in the
compute dtype), the rest as above. An implementation may compute either backward, so the bound is
the larger of the two, element by element.

Every stored intermediate (P Z, dW, D, dS, dR) may be flushed to zero when subnormal (XLA on the
CPU and GPU kernels do), so each error above also has a ``tiny`` (the compute dtype's smallest
normal number; ``S tiny`` for D), and so do the final sums (``(n + 1) tiny``) and ``scale dR``,
which autodiff forms before the product with K or Q (``tiny sum_j |K_j|`` in dq, ``tiny sum_i |Q_i|``
in dk, over attended entries).
The float64 oracle's own error (the same formula with the float64 ``u``) is added, then the rounding
of the result to its dtype: ``u_out |g| + (1 + u_out) err + tiny_out``. Like the forward bound it is
worst-case per sum (about sqrt(n) conservative) and never multiplied by a fudge factor. Gradients
that SPEC.md fixes (keys no query attends, fully excluded rows, excluded bias entries) are compared
exactly, not with this bound.

**Calibrated rule, for other people's kernels.** Per gradient, the larger of the derived bound and
``factor * (e_baseline + u_in * max|g|)``, where ``e_baseline`` is the largest error against the oracle
of the same-dtype backward baseline (every stored intermediate, P·Z, dO Vᵀ, dW, D, dW - D, dS, 1 - t²,
dR, and each result, rounded to the input dtype; sums exact; built on the forward baseline's weights;
dbias from dS rounded per element to the bias's dtype, then summed, as autograd reduces a broadcast
bias in its own dtype) and ``u_in max|g|`` the rounding of the largest exact gradient to its dtype
(FlashAttention-3's ``dq_atol``). ``factor`` is 3, FlashAttention-2's backward rule ("dq within 3 times the PyTorch
same-dtype error", one more than its forward rule of 2: the backward has two more matmuls and the
row reduction D), and 4 under a softcap (one more, as for the forward).

PYTEST_DONT_REWRITE: pytest rewrites the asserts of a plugin's distribution (the ``pytest11``
entry point makes this package one); this module's assertion messages are reported as written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..broadcasting import reduce_to_shape
from ..frameworks import numpy_dtype
from .forward import (
    SMALLEST_NORMAL,
    TRANSCENDENTAL_ERROR,
    UNIT_ROUNDOFF,
    key_blocks,
    lse_compute_error,
    out_compute_error,
    row_error,
    same_dtype_baseline,
    value_size,
)

#: The calibrated rule's factor for gradients, and with a softcap.
GRADIENT_BASELINE_FACTOR = 3
GRADIENT_BASELINE_FACTOR_SOFTCAP = 4


@dataclass(frozen=True)
class GradientBounds:
    """Per-element absolute bounds on dq, dk, dv (shapes of q, k, v) and dbias (bias's shape, or
    None); ``derivation`` says how they were obtained."""

    dq: np.ndarray
    dk: np.ndarray
    dv: np.ndarray
    dbias: np.ndarray | None
    derivation: str = "derived first-order bound for gradients (attention_ref/tolerance/gradients.py)"

    def __mul__(self, factor: float) -> GradientBounds:
        return GradientBounds(self.dq * factor, self.dk * factor, self.dv * factor,
                              None if self.dbias is None else self.dbias * factor,
                              f"{factor:g} × [{self.derivation}]")

    __rmul__ = __mul__


@dataclass(frozen=True)
class GradientProblem:
    """One gradient computation in float64, kv heads repeated to the query heads: q ``(..., Hq, L, E)``,
    k ``(..., Hq, S, E)``, v ``(..., Hq, S, Ev)``, d_out ``(..., Hq, L, Ev)``; allowed, the exact
    weights and the dropout multiplier ``(..., Hq, L, S)``; ``group`` query heads per kv head
    (dk and dv are summed over them); ``bias_shape`` and ``bias_dtype`` None without a bias."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    d_out: np.ndarray
    allowed: np.ndarray
    weights: np.ndarray
    multiplier: np.ndarray
    bias: np.ndarray | None
    bias_shape: tuple[int, ...] | None
    scale: float
    softcap: float | None
    group: int
    bias_dtype: str | None = None

    def kv_sum(self, x: np.ndarray) -> np.ndarray:
        """Sum a per-query-head ``(..., Hq, S, n)`` array over each kv head's group: ``(..., Hkv, S, n)``."""
        if x.ndim < 3 or self.group == 1:
            return x
        return x.reshape(*x.shape[:-3], x.shape[-3] // self.group, self.group, *x.shape[-2:]).sum(axis=-3)

    def exact_logits(self) -> np.ndarray:
        """The exact logits x ``(..., Hq, L, S)`` (rules 3-5), -inf on excluded keys."""
        x = self.scale * np.matmul(self.q, np.swapaxes(self.k, -1, -2))
        if self.softcap is not None:
            x = self.softcap * np.tanh(x / self.softcap)
        if self.bias is not None:
            x = x + self.bias
        return np.where(self.allowed, x, -np.inf)

    def exact_lse(self) -> np.ndarray:
        """The exact lse ``(..., Hq, L)``: -inf on fully excluded rows."""
        x = self.exact_logits()
        row_max = x.max(axis=-1, keepdims=True, initial=-np.inf)
        safe_max = np.where(np.isfinite(row_max), row_max, 0.0)
        with np.errstate(divide="ignore"):
            return (safe_max + np.log(np.exp(x - safe_max).sum(axis=-1, keepdims=True)))[..., 0]

    def exact_parts(self) -> dict[str, np.ndarray]:
        """The exact intermediates: dW, D, dS, t (tanh, or None) and dR."""
        dw = self.multiplier * np.matmul(self.d_out, np.swapaxes(self.v, -1, -2))
        row = (self.weights * dw).sum(axis=-1, keepdims=True)
        ds = self.weights * (dw - row)
        t = None
        dr = ds
        if self.softcap is not None:
            raw = self.scale * np.matmul(self.q, np.swapaxes(self.k, -1, -2))
            t = np.tanh(raw / self.softcap)
            dr = ds * (1 - t * t)
        return dict(dw=dw, row=row, ds=ds, t=t, dr=dr)


def _compute_error(problem: GradientProblem, u: float, tiny: float, delta: np.ndarray, rho: np.ndarray,
                   row_error_override: np.ndarray | None = None,
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """The compute-dtype error of (dq, dk, dv, dbias) for unit roundoff u (module docstring): rho the
    weights' relative error per row, ``row_error_override`` ``(..., L, 1)`` the error of D when it is
    not ``rowsum(P dW)`` (the FlashAttention-2 backward's ``rowsum(dO O)``, rule 19)."""
    p, z, a = problem.weights, problem.multiplier, problem.allowed
    parts = problem.exact_parts()
    dw, row, ds, t, dr = parts["dw"], parts["row"], parts["ds"], parts["t"], parts["dr"]
    keys, length, value_dim = p.shape[-1], p.shape[-2], problem.v.shape[-1]
    abs_q, abs_k, abs_dout = np.abs(problem.q), np.abs(problem.k), np.abs(problem.d_out)

    # Every stored intermediate may also be flushed to zero when subnormal: + tiny each (``a``: attended).
    p_err = rho[..., None] * p + tiny * a
    pz_err = z * (p_err + 2 * u * p) + tiny * a
    dw_err = (z * value_dim * u * np.matmul(abs_dout, np.swapaxes(np.abs(problem.v), -1, -2)) + 2 * u * np.abs(dw)
              + tiny)
    row_err = ((p_err * np.abs(dw) + p * dw_err).sum(axis=-1, keepdims=True)
               + keys * u * (p * np.abs(dw)).sum(axis=-1, keepdims=True) + keys * tiny)
    if row_error_override is not None:
        row_err = row_error_override
    centred = np.abs(dw - row)
    ds_err = p_err * centred + p * (dw_err + row_err + u * centred) + u * np.abs(ds) + tiny * a
    dr_err = ds_err
    if t is not None:
        cap = problem.softcap
        t_err = (1 - t * t) * delta[..., None] / cap + (TRANSCENDENTAL_ERROR + 2) * u * np.abs(t)
        # 1 - t²: the square and the subtraction; dR: the product; autodiff's ((g c)(1 - t²)) / c: two more.
        dr_err = (ds_err * (1 - t * t) + np.abs(ds) * (2 * np.abs(t) * t_err + u * t * t) + 4 * u * np.abs(dr)
                  + tiny * a)
    abs_dr = np.abs(dr)
    s = abs(problem.scale)
    n = problem.group * length
    # scale dR may be formed (and flushed) before the product with K or Q: + tiny per attended term.
    attended = a.astype(np.float64)
    dq = (s * (np.matmul(dr_err, abs_k) + (keys + 1) * u * np.matmul(abs_dr, abs_k)) + (keys + 1) * tiny
          + tiny * np.matmul(attended, abs_k))
    dk = (s * (problem.kv_sum(np.matmul(np.swapaxes(dr_err, -1, -2), abs_q))
               + (n + 1) * u * problem.kv_sum(np.matmul(np.swapaxes(abs_dr, -1, -2), abs_q))) + (n + 1) * tiny
          + tiny * problem.kv_sum(np.matmul(np.swapaxes(attended, -1, -2), abs_q)))
    pz_t = np.swapaxes(p * z, -1, -2)
    dv = (problem.kv_sum(np.matmul(np.swapaxes(pz_err, -1, -2), abs_dout))
          + n * u * problem.kv_sum(np.matmul(pz_t, abs_dout)) + n * tiny)
    dbias = None
    if problem.bias_shape is not None:
        terms = np.prod(ds.shape) // max(int(np.prod(problem.bias_shape)), 1)
        dbias = (reduce_to_shape(ds_err, problem.bias_shape)
                 + terms * u * reduce_to_shape(np.abs(ds), problem.bias_shape) + terms * tiny)
    return dq, dk, dv, dbias


def _flash_backward_error(problem: GradientProblem, u: float, tiny: float, dot_size: np.ndarray,
                          bias_size: np.ndarray, num_key_blocks: int,
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """The compute-dtype error of the FlashAttention-2 backward (SPEC.md rule 19) for unit roundoff u:
    the weights recomputed as ``exp(x - lse)`` from the blocked forward's lse, relative error
    ``expm1(delta + e_lse + u (X + B + |lse|) + T u)``, and ``D = rowsum(dO O)`` from its unrounded out,
    error ``sum_c |dO_c| (e_O,c + Ev u |O_c|) + Ev tiny``."""
    head_dim, keys, value_dim = problem.q.shape[-1], problem.k.shape[-2], problem.v.shape[-1]
    delta, eta, rho = row_error(u, dot_size=dot_size, bias_size=bias_size, softcap=problem.softcap,
                                head_dim=head_dim, keys=keys, extra_logit_error=0.0, num_key_blocks=num_key_blocks)
    lse = problem.exact_lse()
    capped_size = dot_size if problem.softcap is None else np.minimum(dot_size, problem.softcap)
    finite_lse = np.where(np.isfinite(lse), np.abs(lse), 0.0)
    lse_err = lse_compute_error(u, delta, eta, keys, lse)
    rho_p = np.expm1(delta + lse_err + u * (capped_size + bias_size + finite_lse) + TRANSCENDENTAL_ERROR * u)
    pz = problem.weights * problem.multiplier
    values = value_size(problem.v, problem.allowed) * problem.multiplier.max(axis=-1, initial=1.0)[..., None]
    has_dropout = bool(np.any(problem.multiplier != 1.0))
    out_err = out_compute_error(u, rho, keys, values, has_dropout)
    abs_dout, abs_out = np.abs(problem.d_out), np.abs(np.matmul(pz, problem.v))
    d_err = (abs_dout * (out_err + value_dim * u * abs_out)).sum(axis=-1, keepdims=True) + value_dim * tiny
    return _compute_error(problem, u, tiny, delta, rho_p, row_error_override=d_err)


def gradient_error_bounds(problem: GradientProblem, expected: tuple[np.ndarray | None, ...], *, compute_dtype: str,
                          out_dtype: str, bias_dtype: str | None, dot_size: np.ndarray,
                          bias_size: np.ndarray, key_block: int | None = None) -> GradientBounds:
    """Bounds on ``|g - exact|`` for gradients computed in ``compute_dtype`` and returned in
    ``out_dtype`` (dbias in ``bias_dtype``), plus the float64 oracle's own error. ``expected`` is the
    oracle's ``(dq, dk, dv, dbias)``; ``dot_size`` and ``bias_size`` are the per-row sizes of
    ``attention_ref.tolerance.forward`` (they give the logit and weight errors).

    Either backward of SPEC.md may have computed them (rule 14's, or rule 19's FlashAttention-2
    backward after a blocked forward with key blocks of ``key_block``, or of the whole row when None),
    so the bound is the larger of the two analyses, element by element."""
    head_dim, keys = problem.q.shape[-1], problem.k.shape[-2]
    num_key_blocks = key_blocks(keys, key_block)
    total: tuple[np.ndarray | None, ...] | None = None
    for u in (UNIT_ROUNDOFF[compute_dtype], UNIT_ROUNDOFF["float64"]):
        delta, _, rho = row_error(u, dot_size=dot_size, bias_size=bias_size, softcap=problem.softcap,
                                  head_dim=head_dim, keys=keys, extra_logit_error=0.0)
        tiny = SMALLEST_NORMAL[compute_dtype] if u == UNIT_ROUNDOFF[compute_dtype] else SMALLEST_NORMAL["float64"]
        dense = _compute_error(problem, u, tiny, delta, rho)
        flash = _flash_backward_error(problem, u, tiny, dot_size, bias_size, num_key_blocks)
        errors = tuple(None if a is None or b is None else np.maximum(a, b)
                       for a, b in zip(dense, flash, strict=True))
        total = errors if total is None else tuple(None if a is None or b is None else a + b
                                                   for a, b in zip(total, errors, strict=True))
    assert total is not None

    def rounded(err: np.ndarray | None, exact: np.ndarray | None, dtype: str | None) -> np.ndarray | None:
        if err is None or exact is None or dtype is None:
            return None
        u_out = UNIT_ROUNDOFF[dtype]
        return u_out * np.abs(np.asarray(exact, np.float64)) + (1 + u_out) * err + SMALLEST_NORMAL[dtype]

    dq, dk, dv, dbias = (rounded(e, x, d) for e, x, d in
                         zip(total, expected, (out_dtype, out_dtype, out_dtype, bias_dtype), strict=True))
    assert dq is not None and dk is not None and dv is not None
    return GradientBounds(dq, dk, dv, dbias,
                          f"derived first-order bound for gradients, {compute_dtype} compute, {out_dtype} result "
                          "(attention_ref/tolerance/gradients.py)")


def same_dtype_baseline_gradients(problem: GradientProblem, dtype: str) -> tuple[np.ndarray | None, ...]:
    """``(dq, dk, dv, dbias)`` of the textbook backward pass with every stored intermediate rounded
    to ``dtype`` and every sum exact, on the forward baseline's weights (float64 arrays)."""

    def rounder(name: str) -> Callable[[np.ndarray], np.ndarray]:
        rounding = numpy_dtype(name)
        return lambda x: np.asarray(x, np.float64).astype(rounding).astype(np.float64)

    rnd = rounder(dtype)

    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        _, p, _ = same_dtype_baseline(problem.q, problem.k, problem.v, allowed=problem.allowed, bias=problem.bias,
                                      scale=problem.scale, softcap=problem.softcap, dtype=dtype)
        z = rnd(problem.multiplier)
        pz = rnd(p * z)
        dv = rnd(problem.kv_sum(np.matmul(np.swapaxes(pz, -1, -2), problem.d_out)))
        dw = rnd(rnd(np.matmul(problem.d_out, np.swapaxes(problem.v, -1, -2))) * z)
        row = rnd((p * dw).sum(axis=-1, keepdims=True))
        ds = rnd(p * rnd(dw - row))
        dbias = None
        if problem.bias_shape is not None:  # per element in the bias's dtype, as autograd sums a broadcast bias
            rnd_bias = rounder(problem.bias_dtype or dtype)
            dbias = rnd_bias(reduce_to_shape(rnd_bias(ds), problem.bias_shape))
        dr = ds
        if problem.softcap is not None:
            raw = rnd(problem.scale * np.matmul(problem.q, np.swapaxes(problem.k, -1, -2)))
            t = rnd(np.tanh(rnd(raw / problem.softcap)))
            dr = rnd(ds * rnd(1 - rnd(t * t)))
        dq = rnd(problem.scale * rnd(np.matmul(dr, problem.k)))
        dk = rnd(problem.scale * rnd(problem.kv_sum(np.matmul(np.swapaxes(dr, -1, -2), problem.q))))
    return dq, dk, dv, dbias


def calibrated_gradient_bounds(derived: GradientBounds, problem: GradientProblem,
                               expected: tuple[np.ndarray | None, ...], dtype: str) -> GradientBounds:
    """The calibrated rule (module docstring): per gradient, the larger of ``derived`` and
    ``factor * (e_baseline + u_in * max|g|)`` for the same-dtype baseline in ``dtype`` (the input dtype)."""
    baseline = same_dtype_baseline_gradients(problem, dtype)
    dtypes = (dtype, dtype, dtype, problem.bias_dtype or dtype)
    factor = GRADIENT_BASELINE_FACTOR if problem.softcap is None else GRADIENT_BASELINE_FACTOR_SOFTCAP
    bounds: list[np.ndarray | None] = []
    notes: list[str] = []
    derived_bounds = (derived.dq, derived.dk, derived.dv, derived.dbias)
    for name, derived_bound, base, exact, result_dtype in zip(
            ("dq", "dk", "dv", "dbias"), derived_bounds, baseline, expected, dtypes, strict=True):
        if derived_bound is None or exact is None or base is None:
            bounds.append(None)
            continue
        exact = np.asarray(exact, np.float64)
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(base) & np.isfinite(exact)
            error = float(np.where(ok, np.abs(base - exact), 0.0).max(initial=0.0))
        size = float(np.abs(exact).max(initial=0.0))
        bounds.append(np.maximum(derived_bound, factor * (error + UNIT_ROUNDOFF[result_dtype] * size)))
        notes.append(f"{name} {error:.3g}")
    derivation = (f"max of [{derived.derivation}] and {factor} × (largest error of the same-dtype {dtype} backward "
                  f"baseline: {', '.join(notes)}; + u_{dtype} × max|g|)")
    dq, dk, dv, dbias = bounds
    assert dq is not None and dk is not None and dv is not None
    return GradientBounds(dq, dk, dv, dbias, derivation=derivation)
