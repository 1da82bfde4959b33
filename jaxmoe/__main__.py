"""Command line: ``python -m jaxmoe check | bench | tune`` (see :mod:`jaxmoe.tools`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


def _add_check(sub: argparse._SubParsersAction) -> None:
    from jaxmoe.tools import check

    check.add_parser(sub)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from jaxmoe.tools import bench

    p = sub.add_parser("bench", help="time whole MoE layers per implementation against the roofline")
    bench.add_arguments(p)
    p.set_defaults(func=bench.run)


def _add_tune(sub: argparse._SubParsersAction) -> None:
    from jaxmoe.tools import tune

    p = sub.add_parser("tune", help="search kernel block configs for this GPU and write <arch>.json")
    tune.add_arguments(p)
    p.set_defaults(func=tune.run)


COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "check": _add_check,
    "bench": _add_bench,
    "tune": _add_tune,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxmoe", description="jaxmoe: Triton MoE kernels for JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS.values():
        add(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
