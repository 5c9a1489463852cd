"""Measure the kernel checker on the bug zoo (``tests/zoo``): per bug, whether the property expected
to catch it does, over several seeds; false alarms on the correct kernels; wall time; with
``check``'s default settings (100 examples per property, failing cases shrunk).

    python -m benchmarks.checker [--seeds 0 1 2] [--dtypes float16 bfloat16 float32 float64] [--bugs NAME ...]

Run from the repository root. Each bug is checked with its row's ``supports`` and only its row's
property (``check(..., properties=(row.catches,))``): caught means that property's status is "FAIL"
(an "ERROR" is a crash, not a catch). The correct kernels, torch SDPA's math backend and its CPU
flash kernel (without ``scale``, see SPEC.md) run every property.
"""

from __future__ import annotations

import argparse
import time

from attention_ref.testing.adapters import torch_sdpa
from attention_ref.testing.check import check
from tests.zoo import ALL_DTYPES, BUGS, BUGS_BY_NAME, CORRECT_KERNELS

SDPA = {
    "torch.sdpa[MATH]": (torch_sdpa("MATH"), ("mask", "bias", "scale", "causal", "gqa", "value_dim", "grad",
                                              "dbias")),
    "torch.sdpa[FLASH_ATTENTION] (no scale)": (torch_sdpa("FLASH_ATTENTION"), ("mask", "bias", "causal", "gqa",
                                                                                "grad")),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dtypes", nargs="+", default=list(ALL_DTYPES))
    parser.add_argument("--bugs", nargs="+", default=[bug.name for bug in BUGS], choices=list(BUGS_BY_NAME),
                        metavar="NAME", help="the bugs to check (default: all)")
    parser.add_argument("--no-correct", action="store_true", help="skip the correct kernels and SDPA")
    args = parser.parse_args()
    dtypes = tuple(args.dtypes)
    width = max(map(len, args.bugs))
    caught_count = {seed: 0 for seed in args.seeds}
    for name in args.bugs:
        bug = BUGS_BY_NAME[name]
        cells = []
        for seed in args.seeds:
            start = time.perf_counter()
            report = check(bug.kernel, framework="torch", supports=bug.supports, dtypes=dtypes, seed=seed,
                           properties=(bug.catches,))
            status = next(o.status for o in report.outcomes if o.name == bug.catches)
            caught_count[seed] += status == "FAIL"
            verdict = "caught" if status == "FAIL" else status
            cells.append(f"seed {seed}: {verdict} ({time.perf_counter() - start:.1f} s)")
        print(f"{name.ljust(width)}  {bug.catches}: " + ", ".join(cells), flush=True)
    for seed, caught in caught_count.items():
        print(f"seed {seed}: {caught}/{len(args.bugs)} bugs caught by their property", flush=True)
    if args.no_correct:
        return
    correct = {name: (row.kernel, row.supports) for name, row in CORRECT_KERNELS.items()}
    for seed in args.seeds:
        for name, (kernel, supports) in {**correct, **SDPA}.items():
            start = time.perf_counter()
            report = check(kernel, framework="torch", supports=supports, dtypes=dtypes, seed=seed)
            verdict = "pass" if report.passed else "FALSE ALARM\n" + str(report)
            print(f"seed {seed}: {name}: {verdict} ({time.perf_counter() - start:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
