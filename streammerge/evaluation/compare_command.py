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


# the merge script's spellings (``--base_model``) of compare's options
_SCRIPT_SPELLINGS = {"--base_model": "--base-model", "--finetuned_models": "--finetuned-models",
                     "--num_calibration_samples": "--num-calibration-samples", "--cache_dir": "--cache-dir",
                     "--output_dir": "--output"}
_SCRIPT_LISTS = ("--finetuned-models", "--datasets")


def _script_args(args: list[str]) -> list[str]:
    """The script's spellings as compare's, and ``--datasets D1 D2`` as ``--datasets D1 --datasets
    D2``: the values after a list option, up to the next option or a plan file, are its values."""
    out: list[str] = []
    i = 0
    while i < len(args):
        name, equals, value = args[i].partition("=")
        if name == "--":
            return out + args[i:]
        name = _SCRIPT_SPELLINGS.get(name, name)
        out.append(name + equals + value)
        i += 1
        if name in _SCRIPT_LISTS and not equals:
            if i < len(args):
                out.append(args[i])
                i += 1
            while i < len(args) and not (args[i].startswith("-") or args[i].endswith(_PLAN_SUFFIXES)):
                out += [name, args[i]]
                i += 1
    return out


class _CompareCommand(click.Command):
    """Takes ``--methods ties dare_ties task_arithmetic``: one option, several names; and the
    merge script's list options and underscore spellings."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _gather_methods(_script_args(args)))


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
@click.argument("plans", nargs=-1, metavar="[PLAN ...]",
                type=click.Path(dir_okay=False, path_type=Path))
@click.option("--methods", "methods", multiple=True, metavar="NAME [NAME ...]",
              help="Merge the plan once with each of these methods, into DIR/<method>: "
                   "--methods ties dare_ties task_arithmetic (or comma-separated). Without it, each PLAN "
                   "is merged as written, into DIR/<plan file name>.")
@click.option("--param", "params", multiple=True, metavar="METHOD.KEY=VALUE",
              help="A parameter of one of --methods, set in the plan's top-level parameters for that "
                   "method's merge (repeatable; the value is read as YAML), e.g. --param ties.density=0.5.")
@click.option("--data", help=f"{DATA_HELP} Required with a PLAN.")
@click.option("--base-model", metavar="B",
              help="The merge script's form, without a PLAN: the base of --finetuned-models.")
@click.option("--finetuned-models", "finetuned", multiple=True, metavar="M [M ...]",
              help="Models merged as task vectors from --base-model into DIR/ties_magnitude, "
                   "DIR/dare_random, DIR/ties_sparsegpt (and DIR/<method> for each of --methods).")
@click.option("--datasets", multiple=True, metavar="D [D ...]",
              help="One per fine-tuned model (or one for all): model i's calibration data, and "
                   "every merge is evaluated on each.")
@click.option("--density", type=click.FloatRange(0, 1, min_open=True),
              help="Fraction of each task vector kept by the script's merges (default 0.2).")
@click.option("--num-calibration-samples", "calibration_samples", type=click.IntRange(min=1),
              help="Calibration windows of --seqlen tokens per model (default 128).")
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
def compare_command(plans: tuple[Path, ...], methods: tuple[str, ...], params: tuple[str, ...],
                    data: str | None, base_model: str | None, finetuned: tuple[str, ...],
                    datasets: tuple[str, ...], density: float | None, calibration_samples: int | None,
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
      streammerge compare --base-model B --finetuned-models M1 M2 --datasets D1 D2 \\
          --density 0.2 --num-calibration-samples 128 -o runs

    The last form is the LLaMA merge script's (its underscore spellings are accepted): the three
    merges it compares, plus any --methods, evaluated on each dataset; the table and
    DIR/comparison_results.json hold a row per merge and dataset. --cache-dir holds models
    named org/name and, under statistics/, each model's calibration statistics, reused on a rerun.
    """
    names = [n for value in methods for n in re.split(r"[,\s]+", value) if n] if methods else None
    script = {"--base-model": base_model, "--finetuned-models": finetuned, "--datasets": datasets,
              "--density": density, "--num-calibration-samples": calibration_samples}
    given = [flag for flag, value in script.items() if value]
    try:
        if given:
            _script(plans, given[0], data, params, with_inputs)
            from streammerge.frontdoors.merge_script import run_script, script_table

            _, rows = run_script(base_model, list(finetuned), list(datasets), out_dir,
                                 density=0.2 if density is None else density,
                                 calibration_samples=calibration_samples or 128, methods=names,
                                 cache_dir=cache_dir, seqlen=seqlen, samples=samples, stride=stride,
                                 text_field=text_field, max_memory=max_memory, dtype=dtype,
                                 overwrite=overwrite, progress=not quiet)
            click.echo(script_table(rows))
            click.echo(f"wrote {out_dir / 'comparison_results.json'}", err=True)
            return
        if not plans:
            raise PlanError("no plan given: give PLAN files, or the merge script's --base-model B "
                            "--finetuned-models M1 M2 --datasets D1 D2")
        if data is None:
            raise PlanError("--data: missing; give the text every merge is evaluated on, "
                            "e.g. --data wiki.txt")
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


def _script(plans: tuple[Path, ...], flag: str, data: str | None, params: tuple[str, ...],
            with_inputs: bool) -> None:
    """The merge script's form builds its own plans and evaluates on its datasets."""
    if plans:
        raise PlanError(f"{flag}: the merge script's flags build the plans, but PLAN {plans[0]} was given "
                        "too; give either PLAN files or --base-model/--finetuned-models/--datasets")
    clash = ("--data" if data is not None else "--param" if params else "--with-inputs" if with_inputs
             else None)
    if clash is not None:
        raise PlanError(f"{clash}: not taken with the merge script's flags ({flag}): each merge is evaluated "
                        "on --datasets with the script's parameters; drop it, or write a PLAN")
