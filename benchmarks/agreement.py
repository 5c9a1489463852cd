"""Measure how closely the backends agree with the float64 oracle and with each other, per dtype.

For each dtype, random cases of a realistic small shape (GQA, masks, causal, bias, softcap drawn
per case) are run on every installed backend. Reported per backend: the largest absolute error of
out, weights and lse against the float64 oracle on the same rounded inputs, and the largest ratio
of error to the tolerance rule's bound (must stay <= 1); then the largest difference between
backends.

    python -m benchmarks.agreement [--cases 20] [--seed 0]
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np

import attention_ref as ar
from attention_ref.testing import AttentionCase, call
from attention_ref.testing.strategies import numpy_dtype

DTYPES = ("float64", "float32", "float16", "bfloat16")


def random_case(rng: np.random.Generator, dtype: str) -> AttentionCase:
    batch, hkv, group = 2, 2, 2
    length, keys, head_dim, value_dim = (int(n) for n in rng.choice([1, 16, 64, 96], 2).tolist() + [64, 48])
    cast = numpy_dtype(dtype)
    q = rng.standard_normal((batch, hkv * group, length, head_dim)).astype(cast)
    k = rng.standard_normal((batch, hkv, keys, head_dim)).astype(cast)
    v = rng.standard_normal((batch, hkv, keys, value_dim)).astype(cast)
    mask = rng.random((length, keys)) < 0.8 if rng.random() < 0.5 else None
    bias = (rng.standard_normal((hkv * group, length, keys))).astype(cast) if rng.random() < 0.5 else None
    return AttentionCase(q, k, v, mask=mask, bias=bias, causal=bool(rng.random() < 0.5),
                         alignment=str(rng.choice(["top_left", "bottom_right"])),
                         softcap=30.0 if rng.random() < 0.3 else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    backends = [ar.get_backend(name) for name in ar.available_backends()]
    print(f"{'dtype':9} {'backend':7} {'max|out err|':>13} {'max|w err|':>11} {'max|lse err|':>13} {'err/bound':>10}")
    for dtype in DTYPES:
        rng = np.random.default_rng(args.seed)
        worst = {b.name: np.zeros(4) for b in backends}
        between = {pair: 0.0 for pair in itertools.combinations([b.name for b in backends], 2)}
        for _ in range(args.cases):
            case = random_case(rng, dtype)
            oracle = case.oracle()
            bounds = case.bounds(oracle=oracle)
            outs = {}
            for backend in backends:
                result = call(backend, case, return_weights=True, return_lse=True)
                outs[backend.name] = result.out.astype(np.float64)
                errors = []
                ratio = 0.0
                for name in ("out", "weights", "lse"):
                    got, want = getattr(result, name).astype(np.float64), getattr(oracle, name)
                    with np.errstate(invalid="ignore"):  # -inf - -inf on fully excluded rows
                        error = np.where(got == want, 0.0, np.abs(got - want))
                    errors.append(error.max(initial=0.0))
                    bound = getattr(bounds, name)
                    ratio = max(ratio, (error / np.where(bound > 0, bound, np.inf)).max(initial=0.0))
                worst[backend.name] = np.maximum(worst[backend.name], [*errors, ratio])
            for a, b in between:
                between[(a, b)] = max(between[(a, b)], np.abs(outs[a] - outs[b]).max(initial=0.0))
        for name, (out_err, w_err, lse_err, ratio) in worst.items():
            print(f"{dtype:9} {name:7} {out_err:13.3g} {w_err:11.3g} {lse_err:13.3g} {ratio:10.3g}")
        for (a, b), diff in between.items():
            print(f"{dtype:9} {a}-{b}: max |out difference| {diff:.3g}")


if __name__ == "__main__":
    main()
