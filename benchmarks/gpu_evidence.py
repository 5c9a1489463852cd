"""Speed and peak device memory of our torch and jax backends against the frameworks' own attention
on one GPU (the Python part of ``benchmarks/gpu.sh``).

    python -m benchmarks.gpu_evidence [--device cuda] [--dry-run] [--out DIR] [--budget SECONDS] [--rounds N]

Cases: q, k, v ``(1, H, L, 128)`` (``H`` = 8 at L = 4096 and 16384, 1 at 131072), not causal, in
bfloat16 and true float32 (TF32 off: torch ``fp32_precision = "ieee"`` for matmuls and cuDNN, jax
``default_matmul_precision("highest")``). ``--dry-run``: lengths divided by 64 on the CPU (tests and CI).

Implementations: our torch backend (``ar.attention(..., backend="torch")``, blocked, its default tile)
against torch SDPA held to each of its kernels by ``torch.nn.attention.sdpa_kernel`` (cuDNN, flash,
efficient, math); our jax backend against ``jax.nn.dot_product_attention`` (implementation "xla" and
"cudnn", jitted, layout (B, L, H, E) made outside the timing). torch and jax run in separate processes.

Per case and implementation: time, the median over rounds of one call's wall time up to its result
being ready (``torch.cuda.synchronize``, ``block_until_ready``), each round calling every
implementation of the process once in an order that rotates by one each round, after a warm-up call;
``ratio``: the median per-round ratio to the fastest of the framework's own implementations; peak
extra MiB: device memory one call allocated above what was allocated before it (torch:
``max_memory_allocated`` after ``reset_peak_memory_stats``; jax: ``memory_stats()["peak_bytes_in_use"]``
after a ballast allocation has raised the bytes in use to the peak so far, so that the peak can only
move by the call's own allocations; None where the device reports no statistics, as on the CPU). An
implementation that raises (unsupported dtype, out of memory) is reported with its error. Cases not
started within ``--budget`` seconds are reported skipped.

Writes ``speed.json`` (records and environment) and ``speed.md`` (a table) in ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

LENGTHS = (4096, 16384, 131072)
DTYPES = ("bfloat16", "float32")
HEAD_DIM = 128
DRY_RUN_DIVISOR = 64
MIB = 2**20
TORCH_SDPA = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
JAX_NN = ("xla", "cudnn")


def heads(length: int, dry_run: bool) -> int:
    return 1 if length * (DRY_RUN_DIVISOR if dry_run else 1) >= 131072 else 8


def cases(dry_run: bool, lengths: Sequence[int] = LENGTHS, dtypes: Sequence[str] = DTYPES) -> list[dict[str, Any]]:
    """The cases in run order (shortest first): name, length, heads, head_dim, dtype."""
    result = []
    for length in lengths:
        n = length // DRY_RUN_DIVISOR if dry_run else length
        for dtype in dtypes:
            result.append({"name": f"{length // 1024}k-{dtype}", "length": n, "heads": heads(n, dry_run),
                           "head_dim": HEAD_DIM, "dtype": dtype})
    return result


def inputs(case: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q, k, v ``(1, H, L, E)``, standard normal, float32 (cast on the device)."""
    rng = np.random.default_rng(0)
    shape = (1, case["heads"], case["length"], case["head_dim"])
    return tuple(rng.standard_normal(shape, dtype=np.float32) for _ in range(3))  # type: ignore[return-value]


# ---- torch -------------------------------------------------------------------------------------------


def _torch_setup(device: str) -> dict[str, Any]:
    """True float32 matmuls (TF32 off) for the whole process; what was set."""
    import torch

    try:
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.fp32_precision = "ieee"
        setting = {"torch.backends.cuda.matmul.fp32_precision": "ieee", "torch.backends.cudnn.fp32_precision": "ieee"}
    except (AttributeError, RuntimeError):  # torch before 2.9
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        setting = {"torch.backends.cuda.matmul.allow_tf32": False, "torch.backends.cudnn.allow_tf32": False}
    return {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            **setting}


def torch_implementations(case: dict[str, Any], device: str) -> dict[str, Callable[[], Any]]:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import attention_ref as ar

    dtype = getattr(torch, case["dtype"])
    q, k, v = (torch.from_numpy(x).to(device=device, dtype=dtype) for x in inputs(case))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def ours() -> Any:
        out = ar.attention(q, k, v, backend="torch")
        sync()
        return out

    def sdpa(kernel: Any) -> Callable[[], Any]:
        def run() -> Any:
            with sdpa_kernel(kernel):
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            sync()
            return out

        return run

    return {"ours torch": ours, **{f"sdpa {name.lower()}": sdpa(getattr(SDPBackend, name)) for name in TORCH_SDPA}}


def torch_peak_mib(run: Callable[[], Any], device: str) -> float | None:
    import torch

    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run()
    return (torch.cuda.max_memory_allocated() - before) / MIB


# ---- jax ---------------------------------------------------------------------------------------------


def _jax_setup(device: str) -> dict[str, Any]:
    import jax

    return {"jax": jax.__version__, "device": str(_jax_device(device)),
            "float32 matmuls": "jax.default_matmul_precision('highest')"}


def _jax_device(device: str) -> Any:
    import jax

    return jax.devices("gpu" if device == "cuda" else "cpu")[0]


def jax_implementations(case: dict[str, Any], device: str) -> dict[str, Callable[[], Any]]:
    import jax
    import jax.numpy as jnp

    import attention_ref as ar

    target = _jax_device(device)
    dtype = jnp.dtype(case["dtype"])
    q, k, v = (jax.device_put(x, target).astype(dtype) for x in inputs(case))
    qt, kt, vt = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # (B, L, H, E) for jax.nn
    precision = jax.default_matmul_precision("highest") if case["dtype"] == "float32" else contextlib.nullcontext()

    def ours() -> Any:
        with precision:
            return jax.block_until_ready(ar.attention(q, k, v, backend="jax"))

    def jax_nn(implementation: str) -> Callable[[], Any]:
        program = jax.jit(lambda a, b, c: jax.nn.dot_product_attention(a, b, c, implementation=implementation))

        def run() -> Any:
            with precision:
                return jax.block_until_ready(program(qt, kt, vt))

        return run

    return {"ours jax": ours, **{f"jax.nn {name}": jax_nn(name) for name in JAX_NN}}


def jax_peak_mib(run: Callable[[], Any], device: str) -> float | None:
    import jax
    import jax.numpy as jnp

    target = _jax_device(device)
    stats = target.memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    gap = stats["peak_bytes_in_use"] - stats["bytes_in_use"]
    ballast = jax.block_until_ready(jnp.zeros(max(gap, 0) // 4 + 1, jnp.float32, device=target))
    base = target.memory_stats()["bytes_in_use"]
    run()
    peak = target.memory_stats()["peak_bytes_in_use"]
    del ballast
    return (peak - base) / MIB


FRAMEWORKS = {"torch": (_torch_setup, torch_implementations, torch_peak_mib),
              "jax": (_jax_setup, jax_implementations, jax_peak_mib)}


# ---- one framework's process ---------------------------------------------------------------------------


def _error(error: BaseException) -> str:
    first = str(error).strip().splitlines()
    return f"{type(error).__name__}: {first[0][:300] if first else ''}"


def _seconds(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def measure_case(case: dict[str, Any], framework: str, device: str, rounds: int,
                 deadline: float) -> Iterator[dict[str, Any]]:
    """The records of one case for one framework's implementations (see the module docstring)."""
    _, implementations, peak_mib = FRAMEWORKS[framework]
    runs = implementations(case, device)
    errors, warm = {}, {}
    for name, run in runs.items():
        try:
            warm[name] = _seconds(run)
        except Exception as error:  # unsupported here, or out of memory: reported, the others go on
            errors[name] = _error(error)
    order = [name for name in runs if name not in errors]
    # As many rounds as fit before the deadline (at least one), at the warm-up's pace.
    fit = int((deadline - time.time()) / max(sum(warm.values()), 1e-9)) if warm else 0
    times: dict[str, list[float]] = {name: [] for name in order}
    for r in range(max(1, min(rounds, fit))):
        for name in [*order[r % len(order):], *order[: r % len(order)]] if order else []:
            try:
                times[name].append(_seconds(runs[name]))
            except Exception as error:
                errors[name] = _error(error)
    for name in list(times):
        if name in errors:
            times.pop(name)
    own = [name for name in times if not name.startswith("ours")]
    reference = min(own, key=lambda name: statistics.median(times[name])) if own else None
    for name in runs:
        record = {"case": case["name"], "framework": framework, "implementation": name,
                  "shape": [1, case["heads"], case["length"], case["head_dim"]], "dtype": case["dtype"],
                  "error": errors.get(name), "times_s": times.get(name, []), "warmup_s": warm.get(name),
                  "time_s": statistics.median(times[name]) if times.get(name) else None,
                  "reference": reference, "ratio_to_reference": None, "peak_extra_mib": None}
        if name in times and reference is not None:
            record["ratio_to_reference"] = statistics.median(
                a / b for a, b in zip(times[name], times[reference], strict=True))
        if name not in errors:
            try:
                record["peak_extra_mib"] = peak_mib(runs[name], device)
            except Exception as error:
                record["error"] = f"memory: {_error(error)}"
        yield record
    del runs
    if framework == "torch" and device == "cuda":  # what the case held goes back before the next one
        import torch

        torch.cuda.empty_cache()


def framework_main(framework: str, device: str, dry_run: bool, rounds: int, deadline: float,
                   lengths: Sequence[int], dtypes: Sequence[str]) -> dict[str, Any]:
    """Every case for one framework, in this process; cases not started by ``deadline`` are skipped."""
    setup, _, _ = FRAMEWORKS[framework]
    try:
        environment = setup(device)
    except Exception as error:
        return {"environment": {"error": _error(error)}, "records": []}
    records = []
    for case in cases(dry_run, lengths, dtypes):
        if time.time() > deadline:
            records.append({"case": case["name"], "framework": framework, "implementation": "*",
                            "error": "skipped: out of time"})
            continue
        try:
            records += measure_case(case, framework, device, rounds, deadline)
        except Exception as error:  # building the inputs failed (out of memory, say)
            records.append({"case": case["name"], "framework": framework, "implementation": "*",
                            "error": _error(error)})
    return {"environment": environment, "records": records}


def in_fresh_process(framework: str, args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    """``framework_main`` in a new process (``--framework``), stopped at the deadline plus a minute."""
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    env["PYTHONPATH"] = root + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else root
    command = [sys.executable, "-m", "benchmarks.gpu_evidence", "--framework", framework, "--device", args.device,
               "--rounds", str(args.rounds), "--deadline", str(deadline), "--lengths", *map(str, args.lengths),
               "--dtypes", *args.dtypes, *(["--dry-run"] * args.dry_run)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root,
                              timeout=max(1.0, deadline - time.time()) + 60)
    except subprocess.TimeoutExpired:
        return {"environment": {"error": "timed out"}, "records": []}
    sys.stderr.write(done.stderr[-4000:])
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return {"environment": {"error": tail}, "records": []}
    return json.loads(lines[-1])


def _cell(value: Any, form: str) -> str:
    return "-" if value is None else format(value, form)


def markdown(records: Sequence[dict[str, Any]]) -> str:
    """A row per case and implementation: time, ratio to the reference, peak extra MiB, error."""
    lines = ["| case | implementation | time ms | ratio to reference | reference | peak extra MiB | error |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        ms = None if r.get("time_s") is None else r["time_s"] * 1e3
        lines.append(f"| {r['case']} | {r['implementation']} | {_cell(ms, '.3g')} | "
                     f"{_cell(r.get('ratio_to_reference'), '.2f')} | {r.get('reference') or '-'} | "
                     f"{_cell(r.get('peak_extra_mib'), ',.1f')} | {r.get('error') or ''} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--dry-run", action="store_true", help=f"lengths divided by {DRY_RUN_DIVISOR}")
    parser.add_argument("--out", type=Path, default=Path("."), help="where speed.json and speed.md go")
    parser.add_argument("--budget", type=float, default=240.0, metavar="SECONDS",
                        help="cases not started within SECONDS are skipped (default 240)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--framework", choices=tuple(FRAMEWORKS), help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.framework:
        result = framework_main(args.framework, args.device, args.dry_run, args.rounds, args.deadline, args.lengths,
                                args.dtypes)
        print(json.dumps(result), flush=True)
        return 0
    start = time.time()
    results = {}
    for number, framework in enumerate(FRAMEWORKS):  # half the budget each, what torch leaves going to jax
        share = (start + args.budget - time.time()) / (len(FRAMEWORKS) - number)
        results[framework] = in_fresh_process(framework, args, time.time() + share)
        print(f"{framework}: {len(results[framework]['records'])} records in {time.time() - start:.0f} s",
              file=sys.stderr, flush=True)
    records = [r for result in results.values() for r in result["records"]]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed.json").write_text(json.dumps(
        {"device": args.device, "dry_run": args.dry_run, "rounds": args.rounds,
         "environment": {name: result["environment"] for name, result in results.items()}, "records": records},
        indent=1) + "\n")
    table = markdown(records)
    (args.out / "speed.md").write_text(table + "\n")
    print(table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
