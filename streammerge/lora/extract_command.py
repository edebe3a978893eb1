"""``streammerge extract-lora`` and ``streammerge-extract-lora``: mergekit-extract-lora's command line.

Takes mergekit-extract-lora 0.1.5's options under their own spelling and defaults (``--max-rank``
128, ``--distribute-scale``, ``--no-embed-lora``, ``--sv-epsilon`` 0) and its merge options
(``--cuda``, ``--lazy-unpickle``, ...): ``--device`` / ``--cuda`` choose where the SVDs run and
``--transformers-cache`` where Hub models are cached; the others change nothing here and get a
note saying so. Models are named as in a plan: a directory, ``org/name[@revision]`` on the Hub,
or ``MODEL+ADAPTER``.
"""

from __future__ import annotations

from typing import Any

import click

from streammerge import __version__
from streammerge.cli_common import add_options, fail
from streammerge.errors import StreamMergeError
from streammerge.frontdoors import mergekit_cli
from streammerge.lora.extract import ExtractOptions
from streammerge.lora.extraction import ExtractResult, extract_lora

_OPTIONS = [
    click.option("--model", required=True,
                 help="The fine-tuned model: a directory, org/name[@revision] or MODEL+ADAPTER."),
    click.option("--base-model", required=True, help="The model it was fine-tuned from."),
    click.option("--out-path", required=True, type=click.Path(file_okay=False),
                 help="Where the PEFT adapter directory is written."),
    click.option("--max-rank", type=int, default=128, show_default=True,
                 help="Largest rank of a module's factors."),
    click.option("--distribute-scale/--no-distribute-scale", default=True, show_default=True,
                 help="Split the singular values as √σ into both factors (else all into lora_A)."),
    click.option("--embed-lora/--no-embed-lora", default=False, show_default=True,
                 help="Factor the embeddings and the output head too (else they are saved whole, in "
                      "modules_to_save)."),
    click.option("--save-module", "save_modules", multiple=True,
                 help="Save this module (full name, or last name component) whole; repeatable."),
    click.option("-e", "--exclude-regex", "exclude", multiple=True,
                 help="Leave out modules whose name this regex matches; repeatable."),
    click.option("-i", "--include-regex", "include", multiple=True,
                 help="Extract only modules whose name one of these regexes matches; repeatable."),
    click.option("--sv-epsilon", type=float, default=0.0, show_default=True,
                 help="Drop singular values at or below this."),
    click.option("--skip-undecomposable", is_flag=True,
                 help="Leave out modules that are not matrices (norms) instead of saving them whole."),
    click.option("--compute-dtype", type=click.Choice(["auto", "float32"]), default="auto", show_default=True,
                 help="auto: take FT − BASE in the models' dtype, as mergekit does (bf16 models: the "
                      "difference rounded to bf16); float32: the exact difference."),
    click.option("--overwrite", is_flag=True, help="Replace an existing output directory."),
    click.option("--restart", is_flag=True,
                 help="Discard the partial output of an earlier, interrupted run instead of resuming it."),
    mergekit_cli.QUIET_OPTION,
    mergekit_cli.DEVICE_OPTION,
    *mergekit_cli.OPTIONS,
]
# mergekit's options that decide something for an extraction; the others get a note
_USED = {"device", "cuda", "gpu_rich", "safe_serialization", "transformers_cache"}


def _report(result: ExtractResult, quiet: bool) -> None:
    if quiet:
        return
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    worst = max(result.errors.items(), key=lambda kv: kv[1])
    click.echo(f"wrote {result.output}: {result.factored} module(s) as LoRA (r = {result.rank}), "
               f"{result.saved} saved whole, in {result.seconds:.1f} s; largest truncation error "
               f"{worst[1]:.3g} ({worst[0]})")


@click.command("extract-lora", context_settings={"help_option_names": ["-h", "--help"]})
@add_options(_OPTIONS)
@click.version_option(__version__, prog_name="streammerge-extract-lora")
def extract_lora_command(model: str, base_model: str, out_path: str, max_rank: int, distribute_scale: bool,
                         embed_lora: bool, save_modules: tuple[str, ...], exclude: tuple[str, ...],
                         include: tuple[str, ...], sv_epsilon: float, skip_undecomposable: bool,
                         compute_dtype: str, overwrite: bool, restart: bool, quiet: bool,
                         **given: Any) -> None:
    """Extract a LoRA adapter from a fine-tune: per module, the truncated SVD of (MODEL − BASE).

    As mergekit-extract-lora (0.1.5's options and defaults), one module in memory at a time; a
    killed run resumes where it stopped when run again. Writes a PEFT adapter directory:
    adapter_model.safetensors, adapter_config.json (rank_pattern where ranks differ), README.md.
    """
    options = ExtractOptions(max_rank, distribute_scale, embed_lora, tuple(save_modules), tuple(exclude),
                             tuple(include), sv_epsilon, skip_undecomposable, compute_dtype)
    try:
        overrides = mergekit_cli.translate(given, {}).overrides
        unused = sorted(k for k, v in given.items() if k not in _USED and v not in (None, False, 0))
        if unused and not quiet:
            flags = ", ".join("--" + k.replace("_", "-") for k in unused)
            click.echo(f"note: {flags}: no effect on a LoRA extraction", err=True)
        result = extract_lora(model, base_model, out_path, options, overwrite=overwrite, restart=restart,
                              quiet=quiet, device=overrides.get("device", "cpu"),
                              cache_dir=overrides.get("cache_dir"))
    except StreamMergeError as e:
        fail(e)
    _report(result, quiet)


main = extract_lora_command  # the console script streammerge-extract-lora
