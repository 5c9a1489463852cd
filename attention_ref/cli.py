"""The ``attention-ref`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "verify":
        from .verify import verify

        report = verify(args.backends, max_examples=args.max_examples, seed=args.seed)
        print(report.render())
        return 1 if report.failed else 0
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
