"""``streammerge moe CONFIG OUT`` and ``streammerge-moe CONFIG OUT``: mergekit-moe's command line.

Every option of mergekit-moe 0.1.5 is accepted (its merge options are mergekit-yaml's, read by
``frontdoors.mergekit_cli``); those that mean nothing here print one note each.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from streammerge import __version__
from streammerge.cli_common import Size, add_options, fail
from streammerge.errors import StreamMergeError
from streammerge.frontdoors import mergekit_cli

_MOE_OPTIONS = [
    click.option("--overwrite", is_flag=True, help="Replace an existing output directory."),
    click.option(
        "--restart",
        is_flag=True,
        help="Discard the partial output of an earlier, interrupted build instead of resuming it.",
    ),
    mergekit_cli.QUIET_OPTION,
    click.option(
        "--seed",
        type=int,
        help="Seed of the random gate modes and of noise_scale (default 0); "
        "the same seed gives the same bytes.",
    ),
    click.option(
        "--shard-size", type=Size(), help="Largest output shard, e.g. 5GB (default) or 500MB."
    ),
    click.option("--max-memory", type=Size(), help="Peak memory budget for the copies, e.g. 1GiB."),
    click.option(
        "--cache-dir",
        type=click.Path(file_okay=False),
        help="Cache for models named org/name[@revision] on the Hugging Face Hub.",
    ),
    click.option(
        "--load-in-4bit",
        is_flag=True,
        default=False,
        help="Accepted; the hidden states are computed in bfloat16 one layer at a time.",
    ),
    click.option(
        "--load-in-8bit",
        is_flag=True,
        default=False,
        help="Accepted; the hidden states are computed in bfloat16 one layer at a time.",
    ),
    click.option(
        "--i-understand-this-is-not-useful-without-training",
        "allow_all_same",
        is_flag=True,
        default=False,
        help="Build even when every expert is the same model.",
    ),
    mergekit_cli.DEVICE_OPTION,
    *mergekit_cli.OPTIONS,
]
_UNUSED = {
    "allow_crimes": "--allow-crimes: the experts are checked for the base's shapes instead",
    "vocab_policy": "--unsafe-truncate-embeddings: the embeddings are the base's; nothing to truncate",
}


def _build(
    config_file: Path,
    out_path: Path,
    overwrite: bool,
    restart: bool,
    quiet: bool,
    load_in_4bit: bool,
    load_in_8bit: bool,
    allow_all_same: bool,
    **options: Any,
) -> None:
    import warnings

    from streammerge.cli import (  # the CLI's own, once it is loaded
        _report,
        _translated,
        _warn,
    )
    from streammerge.moe.build import build_moe

    warnings.showwarning = _warn
    overrides = _translated(options, quiet)
    notes = [note for key, note in _UNUSED.items() if overrides.pop(key, None)]
    if overrides.pop("device", "cpu") != "cpu":
        notes.append("--device: the routers' hidden states and the copies run on the CPU")
    if load_in_4bit or load_in_8bit:
        notes.append(
            "--load-in-4bit/--load-in-8bit: the hidden states run in bfloat16 a layer at a time; "
            "no quantized load is needed"
        )
    if not quiet:
        for note in notes:
            click.echo(f"note: {note}", err=True)
    try:
        result = build_moe(
            config_file,
            out_path,
            overwrite=overwrite,
            restart=restart,
            quiet=quiet,
            allow_all_same=allow_all_same,
            **overrides,
        )
    except StreamMergeError as e:
        fail(e)
    _report(result, quiet)


def _command(name: str, register: Callable[..., Any]) -> click.Command:
    @register(
        name,
        cls=mergekit_cli.MergekitHelp,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    @click.argument("config_file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
    @click.argument("out_path", type=click.Path(file_okay=False, path_type=Path))
    @add_options(_MOE_OPTIONS)
    def command(**kwargs: Any) -> None:
        """Build a mixture of experts as mergekit-moe's CONFIG_FILE describes, into OUT_PATH: the
        base's attention, norms and embeddings, each expert's MLP as an expert of every layer, and
        routers from the prompts (gate_mode hidden, cheap_embed, random or uniform_random). Streams
        within --max-memory; a killed build resumes when run again."""
        _build(**kwargs)

    return command


moe_command = _command("moe", click.command)
moe_main = click.version_option(__version__, prog_name="streammerge-moe")(
    _command("streammerge-moe", click.command)
)
