"""Measure gradient agreement: each backend's dq, dk, dv, dbias against the float64 oracle, per
dtype, and float64 gradients against finite differences.

    python -m benchmarks.gradients [--examples 200] [--seed 0]

Per backend and dtype it prints the error of each gradient relative to its largest exact entry
(``max|g - exact| / max|exact|``, median and 90th percentile over the gradients of all drawn
cases whose largest entry is at least 1024 times the dtype's smallest normal number: smaller
ones sit at the flush-to-zero floor, where relative errors mean nothing) and the largest
ratio of error to the derived bound (must stay <= 1); for float64, ``|analytic - finite difference|``
relative to ``|analytic|`` (median, 99th percentile) and the largest ratio to the finite-difference
tolerance (``attention_ref.testing.finite_differences.directional_derivatives``).
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import attention_ref as ar
from attention_ref.testing.cases import call_vjp, random_cotangent
from attention_ref.testing.finite_differences import directional_derivatives
from attention_ref.testing.implementation import Subject
from attention_ref.testing.strategies import attention_cases
from attention_ref.tolerance import SMALLEST_NORMAL

BACKENDS = ("numpy", "jax", "torch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    relative: dict[tuple[str, str], list[float]] = defaultdict(list)
    to_bound: dict[tuple[str, str], float] = defaultdict(float)
    fd_relative: dict[str, list[float]] = defaultdict(list)
    fd_to_tolerance: dict[str, float] = defaultdict(float)
    over_bound: list[str] = []

    @seed(args.seed)
    @settings(max_examples=args.examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(attention_cases(), st.integers(0, 2**32 - 1))
    def measure(case, draw_seed: int) -> None:
        d_out = random_cotangent(case, draw_seed)
        expected = case.oracle_gradients(d_out)
        bounds = case.gradient_bounds(d_out, expected)
        for name in BACKENDS:
            grads = call_vjp(ar.get_backend(name), case, d_out)
            for got, want, bound in zip(grads, expected, (bounds.dq, bounds.dk, bounds.dv, bounds.dbias), strict=True):
                if want is None or np.size(want) == 0:
                    continue
                error = np.abs(np.asarray(got, np.float64) - want)
                size = float(np.abs(want).max())
                if size >= 1024 * SMALLEST_NORMAL[case.dtype]:
                    relative[name, case.dtype].append(float(error.max()) / size)
                ratio = float((error / bound).max())
                to_bound[name, case.dtype] = max(to_bound[name, case.dtype], ratio)
                if ratio > 1:
                    worst = np.unravel_index(np.argmax(error / bound), error.shape)
                    over_bound.append(f"{name} {case.dtype}: error {error[worst]:.3g} > bound {bound[worst]:.3g} at "
                                      f"{worst} (got {np.asarray(got, np.float64)[worst]!r}, exact {want[worst]!r}) "
                                      f"for d_out seed {draw_seed}\n  {case!r}")
            if case.dtype == "float64":
                analytic, finite, tolerance = directional_derivatives(Subject(ar.get_backend(name)), case, draw_seed)
                if analytic != 0:
                    fd_relative[name].append(abs(analytic - finite) / abs(analytic))
                if tolerance > 0:
                    fd_to_tolerance[name] = max(fd_to_tolerance[name], abs(analytic - finite) / tolerance)

    measure()
    print(f"{args.examples} drawn cases (all features, all dtypes), seed {args.seed}")
    print(f"{'backend':8s} {'dtype':9s} {'median err/max|g|':>18s} {'p90 err/max|g|':>16s} {'max err/bound':>14s}")
    for key in sorted(relative):
        values = np.asarray(relative[key])
        print(f"{key[0]:8s} {key[1]:9s} {np.median(values):18.3g} {np.percentile(values, 90):16.3g} "
              f"{to_bound[key]:14.3g}")
    for line in over_bound:
        print("OVER THE BOUND:", line)
    print("float64 vs finite differences (directional derivative):")
    for name in BACKENDS:
        values = np.asarray(fd_relative[name])
        print(f"{name:8s} median rel {np.median(values):.3g}, p99 rel {np.percentile(values, 99):.3g}, "
              f"max |diff| / tolerance {fd_to_tolerance[name]:.3g} ({len(values)} cases)")


if __name__ == "__main__":
    main()
