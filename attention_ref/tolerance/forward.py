"""The tolerance rule (SPEC.md rule 10, "Accuracy"): how far a result may lie from the exact answer.

This is the one place where tolerances of attention results are defined (its extension to
gradients, by the same method, is ``attention_ref.tolerance.gradients``). Every comparison in the
property tests asks ``error_bounds`` (or ``gradient_error_bounds``) for its bounds; none picks a
number of its own.

The bound is a first-order forward error analysis of the algorithm SPEC.md prescribes, evaluated
per query row on the actual data. With ``u`` the unit roundoff of the compute dtype, ``T = 8`` the
error of exp/tanh/log and ``D = 2`` the error of a division (both in units of ``u``), and per row r:

* ``A_r = |scale| * max_j sum_e |q_re k_je|`` over the attended keys j (size of the dot products);
* ``X_r = A_r`` (or the softcap c when capped) and ``B_r = max_j |bias_rj|`` over attended keys;
* logit error ``delta_r = (E + 1) u A_r + 4 u (X_r + B_r) + extra_logit_error_r``, plus
  ``D u A_r + (T + 2) u c`` with a softcap c: the dot product (E terms), the scale, the cap
  (a division and a tanh), the bias addition and the max subtraction;
* relative error of each exponential ``eta_r = expm1(delta_r + T u)``, and of each weight
  ``rho_r = 2 eta_r + (S - 1 + D) u`` (normalisation by an S-term sum and a division);
* out: ``|d out_rc| <= (1 + u_out) (rho_r + S u (1 + rho_r)) V_rc + u_out |out_rc| + tiny_out`` with
  ``V_rc = max_j |v_jc|`` over attended keys (the P·V sum of S terms, then the cast to the output
  dtype, ``tiny_out`` its smallest normal number, since subnormals may be flushed to zero, plus
  ``S tiny`` for flushed products in the compute dtype);
* weights: ``|d p_rj| <= rho_r p_rj + tiny`` (``tiny``: smallest normal of the compute dtype);
* lse: ``|d lse_r| <= delta_r + eta_r + (S - 1) u + (T + 1) u |lse_r|``.

* the blocked algorithm (SPEC.md rule 19, ``key_block`` = its ``block_k``, ``nb = ceil(S / block_k)``
  key blocks; nb = 1 is the dense algorithm): for nb > 1, ``delta_r`` gains ``2 u (X_r + B_r)`` (the
  rounded differences of the running maxima sum to at most ``2 (X_r + B_r)``) and ``eta_r`` gains
  ``(nb - 1) (T + 1) u`` (each rescaling multiplies by one exponential, one rounding more). Sums
  taken block by block still round each term at most S times, which the S-term sums count.

The reference answer is the float64 oracle on the *same rounded inputs*, so input rounding is not
part of the bound; the oracle's own error (the same formula with the float64 ``u``) is added.
The worst-case sums (``n u`` for n terms) make the rule conservative by about sqrt(n) in practice;
they are never multiplied by a fudge factor. Two results of the same implementation that should be
equal (a permuted or rescaled call) are compared with twice the bound, one bound for each.
Positions that SPEC.md fixes exactly (excluded keys: weight 0; fully excluded rows: out 0, lse
-inf) are compared exactly, not with a tolerance.

**The calibrated rule, for other people's kernels** (``calibrated_error_bounds``). The derived bound
holds for any implementation that computes as SPEC.md says (float32 for half-precision inputs). Real
kernels may keep some intermediates in the input dtype (jax.nn rounds the probabilities to it
before P·V and returns lse in it; flax linen softmaxes in it). For them the bound is self-calibrating, as
FlashAttention's and PyTorch's own tests are: per element, the larger of the derived bound and

    ``factor * (e_baseline + u_in * size)``

where ``e_baseline`` is the largest error, against the same float64 oracle, of the *same-dtype
baseline*: the textbook algorithm with every stored intermediate (logits, capped logits, biased
logits, shifted logits, exponentials, their sum, weights, out, lse) rounded to the input dtype and
every dot product and sum accumulated exactly (in the spirit of FlashAttention's ``upcast=False``
reference, whose matmuls accumulate in float32; here the softmax steps are rounded too). Rows where
the baseline overflows the input dtype calibrate nothing. For out and lse ``e_baseline`` is the
largest absolute error; for weights it is the largest *relative* error over weights of normal size
in the input dtype, times the weight, plus that dtype's smallest normal number (attended keys
only), so that a row's
weight bounds sum to a small multiple of its weights (row sums and ``out = weights · v`` stay
tight). ``u_in * size`` is the floor: one rounding to the input dtype of the quantity that feeds
the element (``max |v|`` of the row's attended keys for out, ``p`` for weights, ``|lse|`` for
lse), the size of FlashAttention-3's ``fwd_atol``. ``factor`` is
2, FlashAttention's forward rule ("at most twice the numerical error of a PyTorch implementation"),
and 3 with a softcap, FlashAttention's softcap rule (a tanh adds one more rounding of the logits
per key). The baseline's error is a maximum over the whole result, as in FlashAttention's and
PyTorch's tests. For float32 and float64 inputs the baseline error is at most the derived bound in
practice, so the rule is the derived bound; it loosens only for float16 and bfloat16.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..frameworks import numpy_dtype

#: Unit roundoff (half the machine epsilon) per dtype.
UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24, "float64": 2.0**-53}
#: Smallest positive normal number per dtype. Subnormal results may be flushed to zero (XLA on the
#: CPU does, as do GPU kernels), so this is the absolute error floor of any value in that dtype.
SMALLEST_NORMAL = {
    "float16": 2.0**-14,
    "bfloat16": 2.0**-126,
    "float32": 2.0**-126,
    "float64": 2.0**-1022,
}
#: Error of exp, tanh and log in units of roundoff u (8 u = 4 ulps; XLA's float32 tanh was
#: measured at 4.6 u, NumPy's and PyTorch's at about 1 u).
TRANSCENDENTAL_ERROR = 8
#: Error of a division in units of u: XLA computes x / y as x * (1 / y), two roundings.
DIVISION_ERROR = 2


#: The calibrated rule's factor on the same-dtype baseline's error (FlashAttention's forward rule),
#: and with a softcap (FlashAttention's softcap rule).
BASELINE_FACTOR = 2
BASELINE_FACTOR_SOFTCAP = 3


@dataclass(frozen=True)
class ErrorBounds:
    """Per-element absolute bounds, broadcastable to out ``(..., L, Ev)``, weights ``(..., L, S)``
    and lse ``(..., L)``; ``derivation`` says how they were obtained (shown in failure messages)."""

    out: np.ndarray
    weights: np.ndarray
    lse: np.ndarray
    derivation: str = "derived first-order bound (attention_ref/tolerance/forward.py)"

    def __mul__(self, factor: float) -> ErrorBounds:
        return ErrorBounds(self.out * factor, self.weights * factor, self.lse * factor,
                           f"{factor:g} × [{self.derivation}]")

    __rmul__ = __mul__

    def __add__(self, other: ErrorBounds) -> ErrorBounds:
        """The bound on a difference of two results, each within its own bound."""
        return ErrorBounds(self.out + other.out, self.weights + other.weights, self.lse + other.lse,
                           f"[{self.derivation}] + [{other.derivation}]")


def key_blocks(keys: int, key_block: int | None) -> int:
    """``nb = ceil(S / block_k)``, the key blocks of the blocked algorithm (SPEC.md rule 19); 1 for the
    dense algorithm (``key_block`` None) and for S = 0."""
    if key_block is None or keys == 0:
        return 1
    return max(1, -(-keys // key_block))


def row_error(
    u: float,
    *,
    dot_size: np.ndarray,
    bias_size: np.ndarray,
    softcap: float | None,
    head_dim: int,
    keys: int,
    extra_logit_error: np.ndarray | float,
    num_key_blocks: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(delta, eta, rho)`` per row for unit roundoff u (see the module docstring): the logit error, the
    relative error of each exponential and of each weight. The gradient bounds use them too.

    ``num_key_blocks`` (nb) > 1 adds the online softmax's rescalings (rule 19): ``2 u (X + B)`` to
    delta (the rounded differences of the running maxima) and ``(nb - 1) (T + 1) u`` to each
    exponential (one exp and one product per rescaling)."""
    t, d = TRANSCENDENTAL_ERROR, DIVISION_ERROR
    capped_size = dot_size if softcap is None else np.minimum(dot_size, softcap)
    delta = (head_dim + 1) * u * dot_size + 4 * u * (capped_size + bias_size) + extra_logit_error
    if softcap is not None:
        delta = delta + d * u * dot_size + (t + 2) * u * softcap
    if num_key_blocks > 1:
        delta = delta + 2 * u * (capped_size + bias_size)  # rule 19: the running maxima's differences
    eta = np.expm1(delta + t * u + (num_key_blocks - 1) * (t + 1) * u)  # rule 19: nb - 1 rescalings
    rho = 2 * eta + (keys - 1 + DIVISION_ERROR) * u
    return delta, eta, rho


def out_compute_error(u: float, rho: np.ndarray, keys: int, values: np.ndarray, has_dropout: bool) -> np.ndarray:
    """The error of out in the compute dtype, before its rounding to the output dtype, ``(..., L, Ev)``:
    ``(rho' + S u (1 + rho')) V`` with ``rho' = rho`` (+ 2 u with dropout: the multiplier and the
    product rounded) and ``values`` V the largest attended ``|v|`` per channel (times the multiplier)."""
    rho_dropped = rho + 2 * u if has_dropout else rho
    return (rho_dropped + keys * u * (1 + rho_dropped))[..., None] * values


def lse_compute_error(u: float, delta: np.ndarray, eta: np.ndarray, keys: int, lse: np.ndarray) -> np.ndarray:
    """The error of lse in the compute dtype, ``(..., L)``: ``delta + eta + (S - 1) u + (T + 1) u |lse|``
    (``|lse|`` counted 0 where lse is -inf)."""
    finite_lse = np.where(np.isfinite(lse), np.abs(lse), 0.0)
    return delta + eta + max(keys - 1, 0) * u + (TRANSCENDENTAL_ERROR + 1) * u * finite_lse


def error_bounds(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    allowed: np.ndarray,
    bias: np.ndarray | None,
    scale: float,
    softcap: float | None,
    expected_out: np.ndarray,
    expected_weights: np.ndarray,
    expected_lse: np.ndarray,
    compute_dtype: str,
    out_dtype: str,
    extra_logit_error: np.ndarray | float = 0.0,
    dropout_multiplier: np.ndarray | float = 1.0,
    key_block: int | None = None,
) -> ErrorBounds:
    """Bounds on ``|result - exact|`` for a result computed in ``compute_dtype`` and returned in
    ``out_dtype``, plus the float64 oracle's own error.

    q ``(..., Hq, L, E)``, k ``(..., Hq, S, E)`` and v ``(..., Hq, S, Ev)`` with kv heads already
    repeated to Hq (or rank 2); ``allowed`` (bool) and bias broadcast to ``(..., Hq, L, S)``;
    expected_* are the oracle's results. ``extra_logit_error`` (per row, ``(..., Hq, L)``) adds a
    known perturbation of the logits, e.g. the rounding of a bias the caller changed.
    ``dropout_multiplier`` is ``keep / (1 - p)`` (broadcastable to the logits) or 1 without dropout:
    the out bound then covers the attended values scaled by it and two more roundings per term
    (the multiplier's and the product's). ``key_block`` is the blocked algorithm's ``block_k``
    (rule 19; None: the dense algorithm).
    """
    q64, k64, v64 = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    allowed = np.asarray(allowed, dtype=bool)
    dot_size, bias_size = row_sizes(q64, k64, allowed=allowed, bias=bias, scale=scale)
    multiplier = np.broadcast_to(np.asarray(dropout_multiplier, np.float64), allowed.shape)
    has_dropout = bool(np.any(multiplier != 1.0))
    values = value_size(v64, allowed) * multiplier.max(axis=-1, initial=1.0)[..., None]

    head_dim, keys = q64.shape[-1], k64.shape[-2]
    row = dict(dot_size=dot_size, bias_size=bias_size, softcap=softcap, head_dim=head_dim, keys=keys,
               extra_logit_error=extra_logit_error, num_key_blocks=key_blocks(keys, key_block))
    u_out, tiny_out = UNIT_ROUNDOFF[out_dtype], SMALLEST_NORMAL[out_dtype]
    tiny_compute = SMALLEST_NORMAL[compute_dtype]

    compute_out_error = np.zeros(np.shape(expected_out))
    weights_bound = np.full(allowed.shape, tiny_compute)
    lse_bound = np.zeros(dot_size.shape)
    for u in (UNIT_ROUNDOFF[compute_dtype], UNIT_ROUNDOFF["float64"]):
        delta, eta, rho = row_error(u, **row)
        compute_out_error = compute_out_error + out_compute_error(u, rho, keys, values, has_dropout)
        weights_bound = weights_bound + rho[..., None] * np.asarray(expected_weights, np.float64)
        lse_bound = lse_bound + lse_compute_error(u, delta, eta, keys, np.asarray(expected_lse, np.float64))
    # Rounding y (the compute-dtype result) to the output dtype: |rnd(y) - x| <= u_out |x| + (1 + u_out) |y - x|.
    out_bound = (u_out * np.abs(np.asarray(expected_out, np.float64)) + (1 + u_out) * compute_out_error
                 + tiny_out + keys * tiny_compute)
    return ErrorBounds(out=out_bound, weights=weights_bound, lse=lse_bound,
                       derivation=f"derived first-order bound for {compute_dtype} compute, {out_dtype} out"
                                  + ("" if key_block is None else f", key blocks of {key_block}")
                                  + " (attention_ref/tolerance/forward.py)")


def row_sizes(q64: np.ndarray, k64: np.ndarray, *, allowed: np.ndarray, bias: np.ndarray | None,
              scale: float) -> tuple[np.ndarray, np.ndarray]:
    """``(A_r, B_r)`` per row ``(..., L)``: ``|scale| max_j sum_e |q_re k_je|`` and ``max_j |bias_rj|``
    over the attended keys j (the sizes of the dot products and of the bias)."""
    products = abs(scale) * np.matmul(np.abs(q64), np.swapaxes(np.abs(k64), -1, -2))
    dot_size = np.where(allowed, products, 0.0).max(axis=-1, initial=0.0)
    if bias is None:
        return dot_size, np.zeros_like(dot_size)
    bias64 = np.broadcast_to(np.asarray(bias, dtype=np.float64), allowed.shape)
    return dot_size, np.where(allowed & np.isfinite(bias64), np.abs(bias64), 0.0).max(axis=-1, initial=0.0)


def value_size(v64: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """``max_j |v_jc|`` over the attended keys j, per row r and channel c: ``(..., L, Ev)``."""
    return np.where(allowed[..., None], np.abs(v64)[..., None, :, :], 0.0).max(axis=-2, initial=0.0)


def _largest(errors: np.ndarray, where: np.ndarray) -> float:
    """The largest of ``errors`` where ``where`` holds (0 if nowhere)."""
    return float(np.where(where, errors, 0.0).max(initial=0.0))


def same_dtype_baseline(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    allowed: np.ndarray,
    bias: np.ndarray | None,
    scale: float,
    softcap: float | None,
    dtype: str,
    dropout_multiplier: np.ndarray | float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(out, weights, lse)`` of the textbook algorithm with every stored intermediate rounded to
    ``dtype`` and every dot product and sum accumulated exactly (float64 arrays of ``dtype`` values).

    Shapes as for ``error_bounds``; fully excluded rows give out 0, weights 0 and lse -inf.
    """
    rounding = numpy_dtype(dtype)

    def rnd(x: np.ndarray | float) -> np.ndarray:
        return np.asarray(x, np.float64).astype(rounding).astype(np.float64)

    q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k, v))
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        logits = rnd(np.matmul(q64, np.swapaxes(k64, -1, -2)) * scale)
        if softcap is not None:
            logits = rnd(softcap * rnd(np.tanh(rnd(logits / softcap))))
        if bias is not None:
            logits = rnd(logits + np.asarray(bias, np.float64))
        logits = np.where(allowed, logits, -np.inf)
        attended = allowed.any(axis=-1, keepdims=True)
        row_max = np.where(attended, logits.max(axis=-1, keepdims=True, initial=-np.inf), 0.0)
        exps = np.where(allowed, rnd(np.exp(rnd(logits - row_max))), 0.0)
        total = rnd(exps.sum(axis=-1, keepdims=True))
        weights = np.where(attended, rnd(exps / np.where(attended, total, 1.0)), 0.0)
        dropped = weights if np.all(np.asarray(dropout_multiplier) == 1.0) else rnd(weights * rnd(dropout_multiplier))
        out = rnd(np.matmul(dropped, v64))
        lse = np.where(attended, rnd(row_max + rnd(np.log(np.where(attended, total, 1.0)))), -np.inf)[..., 0]
    return out, weights, lse


def calibrated_error_bounds(
    derived: ErrorBounds,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    allowed: np.ndarray,
    bias: np.ndarray | None,
    scale: float,
    softcap: float | None,
    expected_out: np.ndarray,
    expected_weights: np.ndarray,
    expected_lse: np.ndarray,
    dtype: str,
    dropout_multiplier: np.ndarray | float = 1.0,
) -> ErrorBounds:
    """The calibrated rule (module docstring): per element, the larger of the ``derived`` bound and
    ``factor * (e_baseline + u_in * size)`` for the same-dtype baseline in ``dtype`` (the input
    dtype). Arguments as for ``error_bounds``."""
    allowed = np.asarray(allowed, dtype=bool)
    baseline = same_dtype_baseline(q, k, v, allowed=allowed, bias=bias, scale=scale, softcap=softcap, dtype=dtype,
                                   dropout_multiplier=dropout_multiplier)
    out_base, weights_base, lse_base = baseline
    want_out, want_weights, want_lse = (np.asarray(x, np.float64) for x in (expected_out, expected_weights,
                                                                            expected_lse))
    u_in, tiny_in = UNIT_ROUNDOFF[dtype], SMALLEST_NORMAL[dtype]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        # Rows where the baseline overflowed (NaN or inf) calibrate nothing; infinities are compared exactly.
        out_error = _largest(np.abs(out_base - want_out), np.isfinite(want_out) & np.isfinite(out_base))
        lse_error = _largest(np.abs(lse_base - want_lse), np.isfinite(want_lse) & np.isfinite(lse_base))
        # Weights: a relative error (per weight of normal size in the input dtype), so that sums of
        # weight bounds over a row stay proportional to the row's weights.
        normal = allowed & (want_weights >= tiny_in) & np.isfinite(weights_base)
        weights_error = _largest(np.abs(weights_base - want_weights) / want_weights, normal)
    factor = BASELINE_FACTOR if softcap is None else BASELINE_FACTOR_SOFTCAP
    multiplier = np.broadcast_to(np.asarray(dropout_multiplier, np.float64), allowed.shape)
    values = value_size(np.asarray(v, np.float64), allowed) * multiplier.max(axis=-1, initial=1.0)[..., None]
    out = np.maximum(derived.out, factor * (out_error + u_in * values))
    weights = np.maximum(derived.weights,
                         np.where(allowed, factor * ((weights_error + u_in) * want_weights + tiny_in), 0))
    lse = np.maximum(derived.lse, factor * (lse_error + u_in * np.where(np.isfinite(want_lse), np.abs(want_lse), 0.0)))
    derivation = (f"max of [{derived.derivation}] and {factor} × (largest error of the same-dtype {dtype} "
                  f"baseline: out {out_error:.3g}, weights {weights_error:.3g} relative, lse {lse_error:.3g}; "
                  f"+ u_{dtype} × size)")
    return ErrorBounds(out, weights, lse, derivation)
