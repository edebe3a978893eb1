"""``streammerge eval``: the command line over ``evaluate``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from streammerge.cli_common import Size, add_options, fail
from streammerge.errors import StreamMergeError
from streammerge.evaluation.evaluate import EvalResult, evaluate


DATA_SOURCES = ("a .txt file (one document), .jsonl/.json (field 'text'), .parquet, or a Hugging Face "
                "dataset as name[:config]:split.")
DATA_HELP = "Text to score: " + DATA_SOURCES
# the scoring protocol and how models are run: the same for eval and compare (calibrate takes
# the ones named)
TEXT_FIELD = click.option("--text-field", default="text", show_default=True,
                          help="The field holding each document's text.")
SEQLEN = click.option("--seqlen", type=click.IntRange(min=2), default=2048, show_default=True,
                      help="Tokens per window.")
DTYPE = click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
                     show_default=True, help="Compute dtype; auto runs a model in the dtype it is stored in.")
CACHE_DIR = click.option("--cache-dir", type=click.Path(file_okay=False),
                         help="Cache for models named org/name[@revision].")
PROTOCOL_OPTIONS = [
    TEXT_FIELD,
    SEQLEN,
    click.option("--samples", type=click.IntRange(min=1), help="Score only the first N windows."),
    click.option("--stride", type=click.IntRange(min=1),
                 help="Hugging Face's sliding-window protocol with this stride, instead of "
                      "non-overlapping windows."),
    DTYPE,
    CACHE_DIR,
]


def _read_prompts(path: Path) -> list[str]:
    """One prompt per non-blank line."""
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def scores_table(result: EvalResult) -> str:
    gib = result.peak_rss_bytes / 2**30
    lines = [f"model        {result.model}"]
    if result.nll is not None:
        lines += [f"perplexity   {result.perplexity:.6g}",
                  f"loss         {result.nll:.6f} nats per token",
                  f"tokens       {result.tokens} scored in {result.windows} windows of {result.seqlen}"]
    spilled = (f" ({result.spilled_bytes / 2**20:.1f} MiB of activations spilled to disk)"
               if result.spilled_bytes else "")
    lines += [f"seconds      {result.seconds:.1f}",
              f"peak memory  {gib:.2f} GiB{spilled}",
              f"dtype        {result.dtype}"]
    if result.nll is not None:
        lines.append(f"protocol     {result.protocol['description']}")
    return "\n".join(lines)


@click.command("eval", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model")
@click.option("--data", help=DATA_HELP)
@add_options(PROTOCOL_OPTIONS)
@click.option("--prompt", "prompts", multiple=True, help="Continue this text greedily (repeatable).")
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A file of prompts, one per line.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="Tokens each prompt is continued by.")
@click.option("--max-memory", type=Size(),
              help="Peak memory budget, e.g. 2GiB: activations beyond it spill to a temp file.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the results as JSON here.")
@click.option("--spill-dir", type=click.Path(file_okay=False), help="Directory for the activation spill file.")
@click.option("--trust-remote-code", is_flag=True,
              help="Run a checkpoint's own modeling code (config.json auto_map); refused without it.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def eval_command(model: str, data: str | None, text_field: str, seqlen: int, samples: int | None,
                 stride: int | None, prompts: tuple[str, ...], prompts_file: Path | None,
                 max_new_tokens: int, max_memory: int | None, dtype: str, json_out: Path | None,
                 spill_dir: str | None, cache_dir: str | None, trust_remote_code: bool, quiet: bool) -> None:
    """Perplexity of MODEL on --data, and greedy continuations of --prompt, run one decoder layer at
    a time: memory holds one layer's weights, never the model.

    MODEL is what a plan takes: a directory, org/name[@revision], or model+adapter. Needs
    transformers: pip install 'streammerge[eval]'.
    """
    all_prompts = [*prompts, *(_read_prompts(prompts_file) if prompts_file else [])]
    try:
        result = evaluate(model, data, seqlen=seqlen, samples=samples, stride=stride, text_field=text_field,
                          prompts=all_prompts, max_new_tokens=max_new_tokens, dtype=dtype,
                          max_memory=max_memory, trust_remote_code=trust_remote_code, cache_dir=cache_dir,
                          spill_dir=spill_dir, progress=not quiet)
    except StreamMergeError as e:
        fail(e)
    click.echo(scores_table(result))
    for g in result.generations:
        click.echo(f"\nprompt: {g.prompt}\n  ⟶ {g.text}")
    if json_out is not None:
        json_out.write_text(json.dumps(result.as_dict(), indent=2) + "\n")
