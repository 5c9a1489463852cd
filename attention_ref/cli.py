"""The ``attention-ref`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any


def _parser() -> argparse.ArgumentParser:
    from .features import KERNEL_FEATURE_HELP, MASK_POLARITIES, OUT_DTYPES

    parser = argparse.ArgumentParser(prog="attention-ref", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser(
        "verify", help="run the conformance properties of SPEC.md against every installed backend"
    )
    verify.add_argument("--backend", action="append", dest="backends", metavar="NAME",
                        help="a backend to verify (repeatable; default: every installed one)")
    verify.add_argument("--max-examples", type=int, default=50, metavar="N",
                        help="Hypothesis examples per property and backend (default 50)")
    verify.add_argument("--seed", type=int, default=None, help="fix Hypothesis' random choices")
    verify.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                        help="properties not started within SECONDS of the start are reported 'not run'")
    _report_options(verify)
    verify.add_argument("--device", default=None, type=_device, metavar="DEVICE",
                        help="cpu, cuda or gpu (the same), optionally :N: the torch and jax backends' arrays are "
                             "put there, so the properties run there (default: where each backend makes its "
                             "arrays; with a GPU, the default backends are torch and jax, numpy being CPU-only)")

    check = commands.add_parser(
        "check", help="check an attention kernel against SPEC.md",
        description="Check an attention kernel against SPEC.md. The current directory is searched first for "
                    "MODULE (as with python -m). The kernel is called as kernel(q, k, v, **keywords).")
    check.add_argument("target", metavar="MODULE:NAME",
                       help="the kernel, e.g. mypkg.kernels:my_attention: a function, a torch nn.Module instance "
                            "or class (instantiated with no arguments; called in eval mode), a flax nnx or linen "
                            "module or a keras layer")
    check.add_argument("--framework", required=True, choices=("numpy", "jax", "torch"))
    check.add_argument("--supports", default="", metavar="FEATURES",
                       help="comma-separated, any of: " + "; ".join(
                           f"{name}: {meaning}" for name, meaning in KERNEL_FEATURE_HELP.items()))
    check.add_argument("--dtype", action="append", dest="dtypes", metavar="DTYPE",
                       help="float16, bfloat16, float32 or float64 (repeatable; default float32)")
    check.add_argument("--layout", default="bhld", choices=("bhld", "blhd"))
    check.add_argument("--interface", default="dense", choices=("dense", "varlen", "paged", "flex"),
                       help="dense: kernel(q, k, v, **keywords) (default); varlen: FlashAttention's packed layout, "
                            "kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=, max_seqlen_k=, **keywords); "
                            "paged: kernel(q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q=, "
                            "max_seqlen_q=, **keywords), causal bottom-right; flex: the dense call with "
                            "FlexAttention's programs as score_mod= and mask_mod= keywords (rule 22)")
    check.add_argument("--empty-lse", default="-inf", choices=("-inf", "+inf"),
                       help="varlen: the lse the kernel gives a row with no key (+inf: FlashAttention 2; verified)")
    check.add_argument("--lse-layout", default="packed", choices=("packed", "padded"),
                       help="varlen: lse (Hq, total_q) (default) or padded (B, Hq, max_seqlen_q) (verified)")
    check.add_argument("--causal-alignment", default=None, choices=("bottom_right",),
                       help="varlen: the kernel takes no alignment keyword and always aligns bottom-right")
    check.add_argument("--fully-masked", default="zero", choices=("zero", "nan", "mean_v", "skip"),
                       help="what the kernel returns for a fully masked row (default: zero, the spec; nan: out "
                            "and the weights it returns are NaN there, as a naive softmax gives)")
    check.add_argument("--returns", default=None, type=_returns, metavar="RESULTS",
                       help="what the kernel returns on every call, e.g. out,weights (out first, then any of "
                            "weights, lse); then it is never passed return_weights/return_lse, and the results "
                            "named are checked (default: out, or (out, weights, lse) when a return flag is passed)")
    check.add_argument("--mask-polarity", default="attend", choices=MASK_POLARITIES,
                       help="attend: a True mask entry may attend (the spec, torch SDPA, jax.nn; default); "
                            "ignore: True = masked out (torch nn.MultiheadAttention), the kernel is given ~mask")
    check.add_argument("--out-dtype", default=None, choices=OUT_DTYPES,
                       help="the kernel returns out in this dtype for narrower inputs on purpose (default: out "
                            "has the input dtype, the spec); verified, reported as convention differs")
    check.add_argument("--max-examples", type=int, default=100, metavar="N")
    check.add_argument("--seed", type=int, default=None)
    check.add_argument("--workers", type=int, default=None, metavar="N",
                       help="run the properties in N processes at a time (default: one per core, at most 4; "
                            "the report is the same for any N)")
    _report_options(check)
    check.add_argument("--backward", default=None, metavar="MODULE:NAME",
                       help="with grad: the kernel's backward(q, k, v, d_out, **keywords) -> (dq, dk, dv[, dbias]) "
                            "(default: torch autograd / jax.vjp of the kernel)")

    cross = commands.add_parser(
        "crosscheck", help="check every installed framework kernel and layer (torch SDPA and "
                           "nn.MultiheadAttention, jax.nn, flax, keras, Hugging Face) against SPEC.md")
    cross.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    cross.add_argument("--dtype", action="append", dest="dtypes", metavar="DTYPE",
                       help="repeatable; default float32 on the CPU, float16 and bfloat16 and float32 on CUDA")
    cross.add_argument("--target", action="append", dest="only", metavar="NAME",
                       help="only targets whose name contains NAME (repeatable)")
    cross.add_argument("--max-examples", type=int, default=10, metavar="N",
                       help="Hypothesis examples per property and target (default 10)")
    cross.add_argument("--seed", type=int, default=0, help="fix Hypothesis' random choices (default 0)")
    cross.add_argument("--strict", action="store_true", help="exit 1 when any target fails a property")
    cross.add_argument("--workers", "--jobs", type=int, default=None, dest="workers", metavar="N",
                       help="check N targets at a time, each in a process of its own (default: one per core, "
                            "at most 4)")
    cross.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                       help="stop a target's worker after SECONDS; its unfinished properties are ERROR "
                            "(default: 1800 per dtype and per 10 examples)")
    _report_options(cross)
    return parser


def _report_options(command: argparse.ArgumentParser) -> None:
    """The selection, progress and report options every command shares."""
    from .testing.progress import PROGRESS_MODES

    command.add_argument("--property", action="append", dest="properties", metavar="NAME",
                         help="run only this property (repeatable; default: all)")
    command.add_argument("--rules", action="append", type=_rules, default=None, metavar="N[,N...]",
                         help="run only the properties that prove one of these SPEC.md rules (repeatable)")
    command.add_argument("--progress", default="auto", choices=PROGRESS_MODES,
                         help="auto (default): a bar on a terminal (rich), nothing otherwise; bar; lines: a line "
                              "to stderr as each property ends; none")
    command.add_argument("--json", dest="json_path", default=None, metavar="PATH",
                         help="also write the report as JSON (schema: attention_ref/testing/report_schema.json)")
    command.add_argument("--junit-xml", dest="junit_path", default=None, metavar="PATH",
                         help="also write the report as JUnit XML, for CI systems")
    command.add_argument("--plot", dest="plot_dir", default=None, metavar="DIR",
                         help="write a PNG of every FAIL's shrunk case to DIR (and, for crosscheck, of the "
                              "matrix); needs matplotlib (the plot extra)")


def _rules(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"rules are numbers separated by commas, got {text!r}") from None


def _selected_rules(args: argparse.Namespace) -> list[int] | None:
    return None if args.rules is None else [rule for group in args.rules for rule in group]


def _require_plotting(args: argparse.Namespace) -> None:
    """SystemExit before anything runs when ``--plot`` is asked for without matplotlib."""
    import importlib.util

    if args.plot_dir is not None and importlib.util.find_spec("matplotlib") is None:
        raise SystemExit(f"attention-ref {args.command}: --plot needs matplotlib "
                         "(pip install \"attention_ref[plot]\")")


def _write_reports(args: argparse.Namespace, report: Any) -> None:
    from .testing.report_files import write_reports

    if args.json_path is not None or args.junit_path is not None:
        write_reports(report.document(), json_path=args.json_path, junit_path=args.junit_path)


def _device(text: str) -> str:
    from .testing.verify import parse_device

    try:
        parse_device(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _require_cuda() -> None:
    """SystemExit unless torch or jax (those installed) sees a CUDA device; jax, asked, allocates GPU
    memory only as it goes (this process computes nothing)."""
    import importlib.util
    import os

    from .testing.verify import DeviceNotAvailableError, on_device

    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    reasons = []
    for name in ("torch", "jax"):
        if importlib.util.find_spec(name) is None:
            continue
        try:
            on_device(name, "cuda")
        except DeviceNotAvailableError as error:
            reasons.append(str(error))
        else:
            return
    if reasons:
        raise SystemExit("attention-ref crosscheck: no CUDA device: " + "; ".join(reasons))


def _returns(text: str) -> tuple[str, ...]:
    from .features import parse_returns

    try:
        return parse_returns(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _check(args: argparse.Namespace) -> int:
    """``attention-ref check``: load the target (current directory first on sys.path), run, print."""
    from .testing.check_workers import check_in_workers
    from .testing.crosscheck import default_workers
    from .testing.progress import make_progress
    from .testing.targets import TargetError

    supports = tuple(s for s in args.supports.split(",") if s)
    try:
        with make_progress(args.progress) as progress:
            result = check_in_workers(
                args.target, workers=args.workers or default_workers(), backward=args.backward,
                properties=args.properties, rules=_selected_rules(args), progress=progress,
                framework=args.framework, supports=supports, layout=args.layout,
                dtypes=tuple(args.dtypes or ("float32",)), fully_masked=args.fully_masked,
                max_examples=args.max_examples, seed=args.seed, returns=args.returns,
                mask_polarity=args.mask_polarity, out_dtype=args.out_dtype, plot_dir=args.plot_dir,
                interface=args.interface, empty_lse=args.empty_lse, lse_layout=args.lse_layout,
                causal_alignment=args.causal_alignment)
    except (TargetError, ValueError) as error:  # a usage error: what was asked cannot be checked
        raise SystemExit(f"attention-ref check: {error}") from None
    print(result.render())
    _write_reports(args, result)
    return 0 if result.passed else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _require_plotting(args)
    if args.command == "verify":
        from .testing.progress import make_progress
        from .testing.verify import DeviceNotAvailableError, verify

        try:
            with make_progress(args.progress) as progress:
                report = verify(args.backends, max_examples=args.max_examples, seed=args.seed,
                                properties=args.properties, rules=_selected_rules(args), device=args.device,
                                time_limit=args.time_limit, progress=progress, plot_dir=args.plot_dir)
        except DeviceNotAvailableError as error:
            raise SystemExit(f"attention-ref verify: {error}") from None
        print(report.render())
        _write_reports(args, report)
        return 0 if report.passed else 1
    if args.command == "check":
        return _check(args)
    if args.command == "crosscheck":
        from .testing.crosscheck import DEFAULT_DTYPES, crosscheck

        if args.device == "cuda":
            _require_cuda()
        from .testing.progress import make_progress

        with make_progress(args.progress) as progress:
            cross_report = crosscheck(device=args.device,
                                      dtypes=tuple(args.dtypes or DEFAULT_DTYPES[args.device]),
                                      max_examples=args.max_examples, seed=args.seed, only=tuple(args.only or ()),
                                      properties=args.properties, rules=_selected_rules(args),
                                      workers=args.workers, timeout=args.timeout, progress=progress,
                                      plot_dir=args.plot_dir)
        print(cross_report.render())
        _write_reports(args, cross_report)
        return 1 if args.strict and not cross_report.passed else 0
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
