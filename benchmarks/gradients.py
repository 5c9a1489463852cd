"""Measure gradient agreement: each backend's dq, dk, dv, dbias against the float64 oracle, per
dtype, and float64 gradients against finite differences.

    python benchmarks/gradients.py [--examples 200] [--seed 0]

Per backend and dtype it prints the largest error relative to the largest exact gradient
(``max|g - exact| / max|exact|``, over all four gradients) and the largest ratio of error to the
derived bound (must stay <= 1); for float64, the largest ``|analytic - finite difference|`` relative
to ``|analytic|`` and to the finite-difference tolerance (``properties.directional_derivatives``).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import attention_ref as ar  # noqa: E402
from attention_ref.testing.cases import call_vjp  # noqa: E402
from attention_ref.testing.properties import _cotangent, directional_derivatives  # noqa: E402
from attention_ref.testing.strategies import attention_cases  # noqa: E402

BACKENDS = ("numpy", "jax", "torch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    relative: dict[tuple[str, str], float] = defaultdict(float)
    to_bound: dict[tuple[str, str], float] = defaultdict(float)
    fd_relative: dict[str, list[float]] = defaultdict(list)
    fd_to_tolerance: dict[str, float] = defaultdict(float)

    @seed(args.seed)
    @settings(max_examples=args.examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(attention_cases(), st.integers(0, 2**32 - 1))
    def measure(case, draw_seed: int) -> None:
        d_out = _cotangent(case, draw_seed)
        expected = case.oracle_gradients(d_out)
        bounds = case.gradient_bounds(d_out, expected)
        for name in BACKENDS:
            grads = call_vjp(ar.get_backend(name), case, d_out)
            for got, want, bound in zip(grads, expected, (bounds.dq, bounds.dk, bounds.dv, bounds.dbias)):
                if want is None or np.size(want) == 0:
                    continue
                error = np.abs(np.asarray(got, np.float64) - want)
                size = float(np.abs(want).max())
                if size > 0:
                    relative[name, case.dtype] = max(relative[name, case.dtype], float(error.max()) / size)
                to_bound[name, case.dtype] = max(to_bound[name, case.dtype], float((error / bound).max()))
            if case.dtype == "float64":
                analytic, finite, tolerance = directional_derivatives(ar.get_backend(name), case, draw_seed)
                if analytic != 0:
                    fd_relative[name].append(abs(analytic - finite) / abs(analytic))
                if tolerance > 0:
                    fd_to_tolerance[name] = max(fd_to_tolerance[name], abs(analytic - finite) / tolerance)

    measure()
    print(f"{args.examples} drawn cases (all features, all dtypes), seed {args.seed}")
    print(f"{'backend':8s} {'dtype':9s} {'max err / max|g|':>18s} {'max err / bound':>16s}")
    for key in sorted(relative):
        print(f"{key[0]:8s} {key[1]:9s} {relative[key]:18.3g} {to_bound[key]:16.3g}")
    print("float64 vs finite differences (directional derivative):")
    for name in BACKENDS:
        values = np.asarray(fd_relative[name])
        print(f"{name:8s} median rel {np.median(values):.3g}, max rel {values.max():.3g}, "
              f"max |diff| / tolerance {fd_to_tolerance[name]:.3g} ({len(values)} cases)")


if __name__ == "__main__":
    main()
