"""``streammerge compare``: the command line over ``compare``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click
import yaml

from streammerge.cli_common import Size, add_options, fail
from streammerge.errors import PlanError, StreamMergeError
from streammerge.evaluation.commands import DATA_HELP, PROTOCOL_OPTIONS
from streammerge.evaluation.compare import Comparison, compare

_PLAN_SUFFIXES = (".yaml", ".yml")


def _gather_methods(args: list[str]) -> list[str]:
    """``--methods a b c`` as ``--methods a,b,c``: the names after --methods, up to the next option
    or a plan file, are its value."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        out.append(arg)
        i += 1
        if arg == "--":
            return out + args[i:]
        if arg == "--methods":
            start = i
            while i < len(args) and not (args[i].startswith("-") or args[i].endswith(_PLAN_SUFFIXES)
                                         or Path(args[i]).is_file()):
                i += 1
            out += [",".join(args[start:i])] if i > start else []
    return out


class _CompareCommand(click.Command):
    """Takes ``--methods ties dare_ties task_arithmetic``: one option, several names."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _gather_methods(args))


def _method_params(given: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``--param METHOD.KEY=VALUE`` options as {method: {key: value}}, each value read as YAML."""
    out: dict[str, dict[str, Any]] = {}
    for item in given:
        key, equals, text = item.partition("=")
        method, dot, name = key.strip().partition(".")
        if not (equals and dot and method and name and text.strip()):
            raise PlanError(f"--param {item!r}: expected METHOD.KEY=VALUE, e.g. --param ties.density=0.5")
        try:
            out.setdefault(method, {})[name] = yaml.safe_load(text)
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0]
            raise PlanError(f"--param {item!r}: the value is not valid YAML ({first})") from None
    return out


def comparison_table(comparison: Comparison) -> str:
    """One line per row, columns aligned: names to the left, numbers to the right."""
    head = ("name", "method", "perplexity", "loss", "merge s", "eval s", "peak GiB")
    cells = [(r.name, r.method, f"{r.perplexity:.6g}", f"{r.nll:.6f}",
              "-" if r.merge_seconds is None else f"{r.merge_seconds:.1f}", f"{r.eval_seconds:.1f}",
              f"{r.peak_rss_bytes / 2**30:.2f}") for r in comparison.rows]
    widths = [max(len(c) for c in column) for column in zip(head, *cells)]

    def aligned(line: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if k < 2 else c.rjust(w) for k, (c, w) in enumerate(zip(line, widths)))

    return "\n".join(aligned(line).rstrip() for line in (head, *cells))


@click.command("compare", cls=_CompareCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("plans", nargs=-1, required=True, metavar="PLAN [PLAN ...]",
                type=click.Path(dir_okay=False, path_type=Path))
@click.option("--methods", "methods", multiple=True, metavar="NAME [NAME ...]",
              help="Merge the plan once with each of these methods, into DIR/<method>: "
                   "--methods ties dare_ties task_arithmetic (or comma-separated). Without it, each PLAN "
                   "is merged as written, into DIR/<plan file name>.")
@click.option("--param", "params", multiple=True, metavar="METHOD.KEY=VALUE",
              help="A parameter of one of --methods, set in the plan's top-level parameters for that "
                   "method's merge (repeatable; the value is read as YAML), e.g. --param ties.density=0.5.")
@click.option("--data", required=True, help=DATA_HELP)
@click.option("-o", "--output", "out_dir", required=True, metavar="DIR",
              type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the merges, comparison.json and comparison.png.")
@click.option("--with-inputs", is_flag=True,
              help="Also evaluate the base model and each input model, unmerged.")
@add_options(PROTOCOL_OPTIONS)
@click.option("--max-memory", type=Size(),
              help="Peak memory budget of each merge and each evaluation, e.g. 2GiB.")
@click.option("--overwrite", is_flag=True, help="Merge again into output directories that already exist.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines or bars.")
def compare_command(plans: tuple[Path, ...], methods: tuple[str, ...], params: tuple[str, ...], data: str,
                    out_dir: Path, with_inputs: bool, text_field: str, seqlen: int, samples: int | None,
                    stride: int | None, max_memory: int | None, dtype: str, cache_dir: str | None,
                    overwrite: bool, quiet: bool) -> None:
    """Merge a plan with several methods (or several plans) and evaluate each merge; one table.

    PLAN is merged once with each of --methods into DIR/<method> (or each PLAN as written, into
    DIR/<plan file name>), every merge is evaluated on --data as `streammerge eval` does, and one
    table is printed: perplexity, loss, merge and eval seconds and peak memory per merge (and per
    input, with --with-inputs). Writes DIR/comparison.json, and DIR/comparison.png with matplotlib
    (pip install 'streammerge[plot]').

    \b
      streammerge compare plan.yaml --methods ties dare_ties task_arithmetic \\
          --data wiki.txt -o runs --with-inputs --param ties.density=0.5
      streammerge compare a.yaml b.yaml --data wiki.txt -o runs
    """
    names = [n for value in methods for n in re.split(r"[,\s]+", value) if n] if methods else None
    try:
        result = compare(list(plans), data, out_dir, methods=names, method_params=_method_params(params),
                         with_inputs=with_inputs, seqlen=seqlen, samples=samples, stride=stride,
                         text_field=text_field, max_memory=max_memory, dtype=dtype, cache_dir=cache_dir,
                         overwrite=overwrite, progress=not quiet)
    except StreamMergeError as e:
        fail(e)
    click.echo(comparison_table(result))
    click.echo(f"protocol: {result.protocol['description']}", err=True)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    wrote = [result.directory / "comparison.json", *([result.chart] if result.chart else [])]
    click.echo(f"wrote {' and '.join(str(p) for p in wrote)}", err=True)
