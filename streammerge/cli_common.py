"""What every command line shares: sizes as options, and errors printed as one line."""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import click

from streammerge.errors import StreamMergeError
from streammerge.plan.schema import parse_size


class Size(click.ParamType):
    name = "SIZE"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        try:
            return parse_size(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


def add_options(options: list) -> Any:
    """A decorator applying click options in the order listed."""
    def wrap(f: Any) -> Any:
        for opt in reversed(options):
            f = opt(f)
        return f
    return wrap


def fail(e: StreamMergeError) -> NoReturn:
    click.echo(f"error: {e}", err=True)
    sys.exit(1)


def aligned_table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """Columns aligned: the first to the left, the rest (numbers) to the right."""
    widths = [max(len(c) for c in column) for column in zip(head, *rows)]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join(line(r).rstrip() for r in (head, *rows))
