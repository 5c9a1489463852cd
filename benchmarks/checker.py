"""Measure the kernel checker: catch rate on the bug catalogue, false alarms on correct kernels, and
wall time, over several seeds, with ``check``'s default settings (100 examples per property).

    python benchmarks/checker.py [--seeds 0 1 2] [--dtypes float16 bfloat16 float32 float64]

Run from the repository root (it imports the catalogues in ``tests/kernels.py`` and
``tests/kernels_backward.py``). Buggy kernels are
checked with ``fail_fast`` (the first failing property is enough to flag one); correct kernels,
torch SDPA's math backend and its CPU flash kernel (without ``scale``, see SPEC.md) run in full.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attention_ref.testing.adapters import torch_sdpa  # noqa: E402
from attention_ref.testing.check import check  # noqa: E402
from tests.kernels import ALL_FEATURES, BUGGY_KERNELS, CORRECT_KERNELS  # noqa: E402
from tests.kernels_backward import (  # noqa: E402
    ALL_FEATURES_WITH_GRAD,
    BUGGY_BACKWARD_KERNELS,
    reference_kernel_with_backward,
)

SDPA = {
    "torch.sdpa[MATH]": (torch_sdpa("MATH"), ("mask", "bias", "scale", "causal", "gqa", "value_dim", "grad",
                                              "dbias")),
    "torch.sdpa[FLASH_ATTENTION] (no scale)": (torch_sdpa("FLASH_ATTENTION"), ("mask", "bias", "causal", "gqa",
                                                                                "grad")),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16", "float32", "float64"])
    args = parser.parse_args()
    dtypes = tuple(args.dtypes)
    for seed in args.seeds:
        start = time.perf_counter()
        missed = [name for name, (kernel, supports, _) in BUGGY_KERNELS.items()
                  if check(kernel, framework="torch", supports=supports, dtypes=dtypes, seed=seed,
                           fail_fast=True).passed]
        bug_seconds = time.perf_counter() - start
        print(f"seed {seed}: {len(BUGGY_KERNELS) - len(missed)}/{len(BUGGY_KERNELS)} bugs flagged "
              f"({bug_seconds:.0f} s){'; missed: ' + ', '.join(missed) if missed else ''}", flush=True)
        start = time.perf_counter()
        missed = [name for name, (kernel, _) in BUGGY_BACKWARD_KERNELS.items()
                  if check(kernel, framework="torch", supports=ALL_FEATURES_WITH_GRAD, dtypes=dtypes, seed=seed,
                           fail_fast=True).passed]
        print(f"seed {seed}: {len(BUGGY_BACKWARD_KERNELS) - len(missed)}/{len(BUGGY_BACKWARD_KERNELS)} backward, "
              f"window and dropout bugs flagged ({time.perf_counter() - start:.0f} s)"
              f"{'; missed: ' + ', '.join(missed) if missed else ''}", flush=True)
        correct = {name: (kernel, ALL_FEATURES) for name, kernel in CORRECT_KERNELS.items()}
        correct["reference_kernel_with_backward"] = (reference_kernel_with_backward, ALL_FEATURES_WITH_GRAD)
        for name, (kernel, supports) in {**correct, **SDPA}.items():
            start = time.perf_counter()
            report = check(kernel, framework="torch", supports=supports, dtypes=dtypes, seed=seed)
            verdict = "pass" if report.passed else "FALSE ALARM\n" + str(report)
            print(f"seed {seed}: {name}: {verdict} ({time.perf_counter() - start:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
