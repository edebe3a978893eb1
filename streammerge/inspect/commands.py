"""``streammerge check`` and ``streammerge stats``: the command lines over ``inspect``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from streammerge.cli_common import fail
from streammerge.errors import StreamMergeError
from streammerge.inspect.check import check_models
from streammerge.inspect.stats import (CHUNK_ELEMENTS, compare_models, draw_layers, summary_table,
                                       write_json)
from streammerge.plotting import require_matplotlib

_HELP = {"help_option_names": ["-h", "--help"]}
_CACHE = click.option("--cache-dir", type=click.Path(file_okay=False),
                      help="Cache for models named org/name[@revision] on the Hugging Face Hub.")


@click.command("check", context_settings=_HELP)
@click.argument("models", nargs=-1, required=True, metavar="MODEL MODEL [MODEL ...]")
@_CACHE
def check_command(models: tuple[str, ...], cache_dir: str | None) -> None:
    """Whether MODELs can be merged, from config.json and weight headers alone (no weights read).

    Compares architecture, tensor names, shapes, dtypes, vocabulary size, tied embeddings and
    quantization, and prints a table (ok / note: merges as it is / needs: merges with the plan
    setting named / error: cannot be merged) and a verdict. Exit status 0 when the models can be
    merged (possibly with the settings named), 1 when not.
    """
    try:
        report = check_models(list(models), cache_dir)
    except StreamMergeError as e:
        fail(e)
    click.echo(report.table())
    sys.exit(0 if report.mergeable else 1)


@click.command("stats", context_settings=_HELP)
@click.argument("a")
@click.argument("b")
@click.option("--base", help="Base model: also the cosine of the task vectors A-BASE and B-BASE, and "
                             "the fraction of elements where they disagree in sign.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the figures per tensor, layer and module kind to this file.")
@click.option("--png", type=click.Path(dir_okay=False, path_type=Path),
              help="Plot the figures per layer (needs matplotlib: pip install 'streammerge[plot]').")
@click.option("--chunk-size", type=click.IntRange(min=1), default=CHUNK_ELEMENTS, show_default=True,
              help="Elements of each model read at a time (rounded to whole rows).")
@_CACHE
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def stats_command(a: str, b: str, base: str | None, json_path: Path | None, png: Path | None,
                  chunk_size: int, cache_dir: str | None, quiet: bool) -> None:
    """How far model B is from model A, tensor by tensor, in bounded memory.

    Per tensor both hold with one shape: l2_diff = ||A-B||, rel_change = ||A-B|| / ||A||,
    cosine = cos(A, B), summed in float64 a row chunk at a time; with --base also task_cosine
    and sign_disagreement. Prints summaries per layer, per module kind and for the whole model.
    """
    try:
        if png is not None:
            require_matplotlib(f"--png {png}")
        stats = compare_models(a, b, base, chunk_elements=chunk_size, cache_dir=cache_dir,
                               progress=not quiet)
        click.echo(summary_table(stats))
        for name, why in stats.skipped.items():
            click.echo(f"note: {name} not compared: {why}", err=True)
        for name, whose in stats.tied.items():
            click.echo(f"note: {name}: read as {whose}", err=True)
        if json_path is not None:
            write_json(stats, json_path)
            click.echo(f"wrote {json_path}", err=True)
        if png is not None:
            draw_layers(stats, png)
            click.echo(f"wrote {png}", err=True)
    except StreamMergeError as e:
        fail(e)
