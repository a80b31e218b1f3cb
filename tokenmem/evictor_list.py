"""The evictors a benchmark runs: the registry's names, narrowed with ``--evictors`` (one helper for every
benchmark, so no benchmark keeps a hand-written list of names).

>>> parser = argparse.ArgumentParser()
>>> add_evictors_argument(parser)              # --evictors NAME [NAME ...], default: every registered evictor
>>> args = parser.parse_args(["--evictors", "sink", "snapkv"])
"""

from __future__ import annotations

import argparse

from .errors import UnknownEvictorError
from .evictor import list_evictors


def registered(exclude=()) -> list[str]:
    """Every registered evictor name, ``full`` (the no-eviction baseline) first, then alphabetical; minus ``exclude``."""
    names = list(list_evictors())
    ordered = (["full"] if "full" in names else []) + [n for n in names if n != "full"]
    return [n for n in ordered if n not in set(exclude)]


def check_evictors(names) -> list[str]:
    """``names`` as a list, each a registered evictor (else :class:`UnknownEvictorError` listing them)."""
    known = registered()
    bad = [n for n in names if n not in known]
    if bad:
        raise UnknownEvictorError(f"unknown evictor {bad[0]!r}; registered evictors: {', '.join(known)}")
    return list(names)


def _known(name: str) -> str:
    try:
        return check_evictors([name])[0]
    except UnknownEvictorError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_evictors_argument(parser: argparse.ArgumentParser, *, exclude=(), help: str | None = None) -> None:
    """``--evictors NAME [NAME ...]``: registered names (checked at parse time); default every registered
    evictor but ``exclude``."""
    default = registered(exclude)
    parser.add_argument("--evictors", nargs="+", type=_known, default=default, metavar="NAME",
                        help=help or f"evictors to run (registered names; default: {' '.join(default)})")
