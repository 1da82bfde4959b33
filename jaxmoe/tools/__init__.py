"""The command-line tools behind ``python -m jaxmoe``: ``check``, ``bench``, ``tune``.

Shared here: argument types that reject bad values with a one-line message, and the
``--impl`` form (comma-separated names, the option repeatable) of ``check`` and ``bench``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

__all__ = ["CommandError", "positive_int", "implementations"]


class CommandError(Exception):
    """A bad command line found after parsing: ``python -m jaxmoe`` prints it as one line and exits 2."""


def positive_int(text: str) -> int:
    """An ``argparse`` type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def implementations(values: Sequence[str] | None, known: Sequence[str] | None = None) -> list[str] | None:
    """The names given to ``--impl`` (each use comma-separated), in order, without repeats;
    None when the option was not given. Raises :class:`CommandError` when it names nothing,
    or (with ``known``) a name not in ``known``."""
    if values is None:
        return None
    names = list(dict.fromkeys(n.strip() for v in values for n in v.split(",") if n.strip()))
    if not names:
        raise CommandError(f"--impl names no implementation (got {','.join(values)!r}); "
                           "give comma-separated names" + (f" from {', '.join(known)}" if known else ""))
    if known is not None:
        unknown = [n for n in names if n not in known]
        if unknown:
            raise CommandError(f"--impl: unknown implementation {', '.join(map(repr, unknown))}; "
                               f"known: {', '.join(known)}")
    return names
