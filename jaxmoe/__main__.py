"""Command line: ``python -m jaxmoe check | bench | tune`` (see :mod:`jaxmoe.tools`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn


class _Parser(argparse.ArgumentParser):
    """Bad arguments end in one line on stderr (exit 2), not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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
    from jaxmoe import __version__
    from jaxmoe.tools import CommandError

    parser = _Parser(prog="python -m jaxmoe", description="jaxmoe: Triton MoE kernels for JAX")
    parser.add_argument("--version", action="version", version=f"jaxmoe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS.values():
        add(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CommandError as err:
        print(f"python -m jaxmoe {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
