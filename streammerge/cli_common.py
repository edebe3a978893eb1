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
