"""Time each backend against torch SDPA on the CPU, and measure the peak extra memory of one call.

    python -m benchmarks.speed [--cases NAME ...] [--backends numpy torch jax] [--rounds 5] [--quick]
                               [--markdown] [--json PATH] [--no-memory]
    python -m benchmarks.speed --case head131k       # opt-in: one float64 head of 131072 tokens

Every call is ``ar.attention(q, k, v, backend=name, ...)`` (blocked, the backend's default tile) on
arrays of the backend's framework (``ar.get_backend(name).asarray``), made once outside the timing;
gradient cases call ``ar.attention_vjp``. The yardstick is torch SDPA
(``torch.nn.functional.scaled_dot_product_attention``) held to its CPU flash kernel
(``SDPBackend.FLASH_ATTENTION``), given the same tensors; its gradients come from autograd.

Per case and backend:

* time: the median over ``--rounds`` rounds of one call's wall time (jax results waited for). Each
  round times SDPA and every backend once, in an order that rotates by one each round; each was
  called once before the first round (jax compiles then);
* ratio: the median of the per-round ratios of the backend's time to SDPA's time;
* peak extra MiB: in a fresh process (``--memory-child``), after a warm-up call of the same shape
  (so that jax's compilation is not counted), the peak resident set of one call (``VmHWM``, reset
  through ``/proc/self/clear_refs``) minus the resident set before it; it includes the call's
  result. glibc's malloc is told to map every block of 128 KiB or more on its own
  (``MALLOC_MMAP_THRESHOLD_``), so that memory freed by the warm-up goes back to the system and the
  measured call is seen allocating its own;
* gradient cases: time and ratio of the gradient call (ours ``attention_vjp``, SDPA forward and
  backward through autograd), and ``grad/fwd``, the median per-round ratio of the gradient call's
  time to the forward call's time of the same implementation (SDPA's forward without autograd).

The opt-in case ``head131k`` measures time and memory only (no rounds): each implementation in its
own fresh process, a warm-up call, then one call timed and measured (two calls of minutes each per
implementation on 2 cores). ``--quick`` divides every length by 64 (tests of this script).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import attention_ref as ar

BACKENDS = ("numpy", "torch", "jax")
SDPA = "sdpa"
QUICK_DIVISOR = 64
MIB = 2**20


@dataclass(frozen=True)
class Case:
    """One benchmark call: q ``(batch, hq, q_len, head_dim)``, k and v ``(batch, hkv, kv_len,
    head_dim)`` in ``dtype``; ``grad``: the gradient call too; ``opt_in``: run only when named,
    measured once per implementation (time and memory, no rounds)."""

    name: str
    batch: int
    hq: int
    hkv: int
    q_len: int
    kv_len: int
    head_dim: int
    dtype: str
    causal: bool = False
    grad: bool = False
    opt_in: bool = False

    @property
    def shape(self) -> str:
        heads = f"{self.hq}" if self.hq == self.hkv else f"{self.hq}/{self.hkv}"
        return f"({self.batch}, {heads}, {self.q_len}, {self.kv_len}, {self.head_dim})"

    @property
    def label(self) -> str:
        kind = " causal" if self.causal else ""
        kind += " fwd+bwd" if self.grad else ""
        return f"{self.shape} {self.dtype}{kind}"

    def quick(self) -> Case:
        """The case with every length divided by ``QUICK_DIVISOR`` (at least 1)."""
        return dataclasses.replace(self, q_len=max(1, self.q_len // QUICK_DIVISOR),
                                   kv_len=max(1, self.kv_len // QUICK_DIVISOR))


def _cases() -> list[Case]:
    cases = []
    for dtype in ("float32", "float64"):
        short = dtype.replace("float", "f")
        cases += [Case(f"mha4k-{short}", 1, 8, 8, 4096, 4096, 64, dtype),
                  Case(f"mha4k-causal-{short}", 1, 8, 8, 4096, 4096, 64, dtype, causal=True)]
    cases += [Case(f"gqa2k-{d.replace('float', 'f')}", 2, 16, 4, 2048, 2048, 64, d) for d in ("float32", "float64")]
    cases += [Case(f"head16k-{d.replace('float', 'f')}", 1, 1, 1, 16384, 16384, 64, d) for d in ("float32", "float64")]
    cases += [Case("decode32k-f32", 1, 32, 8, 1, 32768, 128, "float32")]
    cases += [Case(f"grad4k-{d.replace('float', 'f')}", 1, 8, 8, 4096, 4096, 64, d, grad=True)
              for d in ("float32", "float64")]
    cases += [Case("head131k", 1, 1, 1, 131072, 131072, 64, "float64", opt_in=True)]
    return cases


CASES = {case.name: case for case in _cases()}
DEFAULT_CASES = [name for name, case in CASES.items() if not case.opt_in]


# ---- the calls -------------------------------------------------------------------------------------


def inputs(case: Case, seed: int = 0) -> tuple[np.ndarray, ...]:
    """q, k, v and a cotangent d_out (standard normal, in the case's dtype), the same every run."""
    rng = np.random.default_rng(seed)
    shapes = [(case.batch, case.hq, case.q_len, case.head_dim), (case.batch, case.hkv, case.kv_len, case.head_dim),
              (case.batch, case.hkv, case.kv_len, case.head_dim), (case.batch, case.hq, case.q_len, case.head_dim)]
    return tuple(rng.standard_normal(shape).astype(case.dtype) for shape in shapes)


def calls(impl: str, case: Case, arrays: Sequence[np.ndarray]) -> dict[str, Callable[[], Any]]:
    """``{"forward": call}``, with ``"grad"`` for gradient cases, for ``impl`` (a backend name or
    ``SDPA``) on its framework's copies of ``arrays``; each call returns once its result is ready."""
    q, k, v, d_out = arrays
    if impl == SDPA:
        return _sdpa_calls(case, q, k, v, d_out)
    backend = ar.get_backend(impl)
    tq, tk, tv, td = (backend.asarray(x) for x in (q, k, v, d_out))
    ready: Callable[[Any], Any] = _jax_ready if backend.framework == "jax" else (lambda x: x)
    result = {"forward": lambda: ready(ar.attention(tq, tk, tv, backend=impl, causal=case.causal))}
    if case.grad:
        result["grad"] = lambda: ready(ar.attention_vjp(tq, tk, tv, td, backend=impl, causal=case.causal))
    return result


def _jax_ready(x: Any) -> Any:
    import jax

    return jax.block_until_ready(x)


def _sdpa_calls(case: Case, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                d_out: np.ndarray) -> dict[str, Callable[[], Any]]:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    tq, tk, tv, td = (torch.from_numpy(x) for x in (q, k, v, d_out))
    keywords = {"is_causal": case.causal, "enable_gqa": case.hq != case.hkv}

    def forward() -> Any:
        with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, **keywords)

    result = {"forward": forward}
    if case.grad:
        leaves = [x.detach().requires_grad_() for x in (tq, tk, tv)]

        def grad() -> Any:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                out = torch.nn.functional.scaled_dot_product_attention(*leaves, **keywords)
            return torch.autograd.grad(out, leaves, td)

        result["grad"] = grad
    return result


# ---- time --------------------------------------------------------------------------------------------


def _seconds(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def time_case(case: Case, impls: Sequence[str], rounds: int) -> tuple[dict[str, dict[str, list[float]]],
                                                                      dict[str, str]]:
    """Per implementation and call kind, the wall time of each of ``rounds`` rounds: each round calls
    every implementation once (its forward, then its gradient call), the order rotating by one each
    round, after one untimed call of each. An implementation whose first calls raise is left out,
    with its error (second result)."""
    arrays = inputs(case)
    runs, errors = {}, {}
    for impl in impls:
        try:
            runs[impl] = calls(impl, case, arrays)
            for run in runs[impl].values():
                run()
        except Exception as error:  # reported in its row; the others go on
            runs.pop(impl, None)
            errors[impl] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    order = list(runs)
    times: dict[str, dict[str, list[float]]] = {impl: {kind: [] for kind in runs[impl]} for impl in order}
    for r in range(rounds):
        for impl in [*order[r % len(order):], *order[: r % len(order)]] if order else []:
            for kind, run in runs[impl].items():
                times[impl][kind].append(_seconds(run))
    return times, errors


# ---- memory ------------------------------------------------------------------------------------------


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as status:
        match = re.search(rf"^{field_name}:\s+(\d+) kB", status.read(), re.MULTILINE)
    if match is None:
        raise OSError(f"/proc/self/status has no {field_name}")
    return int(match[1])


def measure_memory(case: Case, impl: str) -> dict[str, float]:
    """In this process: after a warm-up call, one call's peak resident set above the resident set
    before it (MiB) and its wall time (s); the gradient call for gradient cases."""
    arrays = inputs(case)
    run = calls(impl, case, arrays)["grad" if case.grad else "forward"]
    run()
    gc.collect()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # the peak resident set (VmHWM) starts again from the current one
    seconds = _seconds(run)
    peak = _status_kib("VmHWM")
    return {"peak_extra_mib": (peak - before) / 1024, "seconds": seconds}


def memory_in_fresh_process(case: Case, impl: str, quick: bool, timeout: float | None = None) -> dict[str, Any]:
    """``measure_memory`` in a new Python process (``--memory-child``); on failure ``{"error": ...}``."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else root
    command = [sys.executable, "-m", "benchmarks.speed", "--memory-child", case.name, impl, *(["--quick"] * quick)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- one case ------------------------------------------------------------------------------------------


def run_case(case: Case, backends: Sequence[str], rounds: int, quick: bool, memory: bool) -> list[dict[str, Any]]:
    """The records of one case, one per backend (``FIELDS``), SDPA's figures beside each."""
    impls = [SDPA, *backends]
    if case.opt_in:
        measured = {impl: memory_in_fresh_process(case, impl, quick) for impl in impls}
        sdpa = measured[SDPA]
        return [_record(case, name, sdpa_time=sdpa.get("seconds"), sdpa_mib=sdpa.get("peak_extra_mib"),
                        time=measured[name].get("seconds"), mib=measured[name].get("peak_extra_mib"),
                        ratio=_ratio(measured[name].get("seconds"), sdpa.get("seconds")),
                        error=measured[name].get("error") or sdpa.get("error"), rounds=1)
                for name in backends]
    times, errors = time_case(case, impls, rounds)
    mib = {impl: memory_in_fresh_process(case, impl, quick) if memory else {} for impl in impls}
    kind = "grad" if case.grad else "forward"
    records = []
    for name in backends:
        error = errors.get(name) or mib[name].get("error")
        if SDPA in errors or mib[SDPA].get("error"):
            error = (f"{error}; " if error else "") + f"SDPA: {errors.get(SDPA) or mib[SDPA].get('error')}"
        ours, sdpa = times.get(name, {}), times.get(SDPA, {})
        record = _record(
            case, name, rounds=rounds, time=_median(ours.get(kind)), sdpa_time=_median(sdpa.get(kind)),
            ratio=_median([a / b for a, b in zip(ours[kind], sdpa[kind], strict=True)]) if ours and sdpa else None,
            mib=mib[name].get("peak_extra_mib"), sdpa_mib=mib[SDPA].get("peak_extra_mib"), error=error,
            times=ours.get(kind, ()), sdpa_times=sdpa.get(kind, ()))
        if case.grad and ours and sdpa:
            record["forward_time_s"] = statistics.median(ours["forward"])
            record["grad_over_forward"] = statistics.median(g / f for g, f in zip(ours["grad"], ours["forward"],
                                                                                   strict=True))
            record["sdpa_forward_time_s"] = statistics.median(sdpa["forward"])
            record["sdpa_grad_over_forward"] = statistics.median(g / f for g, f in zip(sdpa["grad"], sdpa["forward"],
                                                                                       strict=True))
        records.append(record)
    return records


def _median(values: Sequence[float] | None) -> float | None:
    return statistics.median(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def _record(case: Case, backend: str, *, rounds: int, time: float | None = None, ratio: float | None = None,
            mib: float | None = None, sdpa_time: float | None = None, sdpa_mib: float | None = None,
            error: str | None = None, times: Sequence[float] = (), sdpa_times: Sequence[float] = ()) -> dict[str, Any]:
    return {"case": case.name, "label": case.label, "shape": [case.batch, case.hq, case.hkv, case.q_len, case.kv_len,
                                                               case.head_dim],
            "dtype": case.dtype, "causal": case.causal, "grad": case.grad, "backend": backend, "rounds": rounds,
            "time_s": time, "ratio_to_sdpa": ratio, "peak_extra_mib": mib, "sdpa_time_s": sdpa_time,
            "sdpa_peak_extra_mib": sdpa_mib, "times_s": list(times), "sdpa_times_s": list(sdpa_times),
            "error": error}


# ---- output ------------------------------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3g} ms" if ms < 1000 else f"{ms:,.0f} ms"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}" if abs(value) < 100 else f"{value:,.0f}"


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table(records: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The README table: header and rows (case, backend, time, ratio to SDPA, peak extra MiB, SDPA
    time, SDPA MiB; with gradient cases, grad/fwd as ours / SDPA's)."""
    header = ["case", "backend", "time", "ratio to SDPA", "peak extra MiB", "SDPA time", "SDPA MiB"]
    grad = any(r["grad"] for r in records)
    if grad:
        header.append("grad/fwd (SDPA)")
    rows = []
    for r in records:
        row = [r["label"], r["backend"], _ms(r["time_s"]), _times(r["ratio_to_sdpa"]), _mib(r["peak_extra_mib"]),
               _ms(r["sdpa_time_s"]), _mib(r["sdpa_peak_extra_mib"])]
        if grad:
            row.append(f"{r['grad_over_forward']:.2f} ({r['sdpa_grad_over_forward']:.2f})"
                       if "grad_over_forward" in r else "")
        if r["error"]:
            row[1] += f" (error: {r['error']})"
        rows.append(row)
    return header, rows


def markdown(records: Sequence[dict[str, Any]]) -> str:
    header, rows = table(records)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def text(records: Sequence[dict[str, Any]]) -> str:
    header, rows = table(records)
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                     for row in [header, *rows])


def environment() -> dict[str, Any]:
    """Versions and machine of the run."""
    import importlib.metadata

    versions = {}
    for name in ("numpy", "torch", "jax"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "load_average": os.getloadavg(), **versions}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, choices=list(CASES), metavar="NAME",
                        help=f"cases to run (default: all but the opt-in head131k): {', '.join(CASES)}")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5; 3 with --quick)")
    parser.add_argument("--quick", action="store_true", help=f"every length divided by {QUICK_DIVISOR}")
    parser.add_argument("--markdown", action="store_true", help="print the README's markdown table")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the records as JSON")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    parser.add_argument("--memory-child", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        name, impl = args.memory_child
        case = CASES[name].quick() if args.quick else CASES[name]
        print(json.dumps(measure_memory(case, impl)), flush=True)
        return 0
    rounds = args.rounds or (3 if args.quick else 5)
    names = list(dict.fromkeys(args.cases))
    records = []
    for name in names:
        case = CASES[name].quick() if args.quick else CASES[name]
        start = time.perf_counter()
        records += run_case(case, args.backends, rounds, args.quick, memory=not args.no_memory)
        print(f"{case.name}: {case.label} done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    print(markdown(records) if args.markdown else text(records), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps({"environment": environment(), "quick": args.quick, "rounds": rounds,
                                         "records": records}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
