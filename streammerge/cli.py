"""Command line: ``streammerge run``, ``streammerge plan``, ``streammerge verify``, ``streammerge methods``."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import click

from streammerge import __version__
from streammerge.api import merge, merge_stages, schedule
from streammerge.engine import MergeResult
from streammerge.errors import PlanError, StreamMergeError
from streammerge.calibration.command import calibrate_command
from streammerge.cli_common import Size, add_options, fail
from streammerge.evaluation.commands import eval_command
from streammerge.evaluation.compare_command import compare_command
from streammerge.executors.summary import task_summary
from streammerge.frontdoors import linear, mergekit_cli
from streammerge.inspect.commands import check_command, stats_command
from streammerge.lora.extract_command import extract_lora_command
from streammerge.inspect.stats import output_statistics, summary_table, write_merge_stats
from streammerge.methods import compiled, get_method, method_names
from streammerge.moe.command import moe_command, moe_main
from streammerge.plan.load import read_documents


_plan_options = [
    click.option("--shard-size", type=Size(), help="Largest output shard, e.g. 5GB (default) or 500MB."),
    click.option("--max-memory", type=Size(), help="Peak memory budget, e.g. 2GiB; chunks are sized to fit it."),
    click.option("--chunk-size", type=click.IntRange(min=1), help="Elements per chunk (rounded to whole rows); overrides --max-memory."),
    click.option("--compute-dtype", type=click.Choice(["auto", "float32", "float64"]),
                 help="auto: as mergekit (the plan's dtype); float32/float64: compute wide and round once at the end."),
    click.option("--max-gpu-memory", type=Size(),
                 help="GPU memory for working chunks, e.g. 8GiB (default: 80% of the free GPU memory); a tensor that runs "
                      "out of GPU memory is merged again in smaller chunks."),
    click.option("--seed", type=int, help="Seed for random methods (dare_*, della*); the same seed gives the same bytes."),
    click.option("--allow-nonfinite", is_flag=True, default=None,
                 help="Merge inputs that hold NaN or Inf, and write non-finite results, instead of stopping."),
    click.option("--cache-dir", type=click.Path(file_okay=False), help="Cache for models named org/name[@revision] on the Hugging Face Hub."),
    click.option("--disk-budget", type=Size(),
                 help="Disk for Hub downloads plus the output (when on the same filesystem), e.g. "
                      "20GB: each Hub shard is downloaded just before it is needed, alongside the "
                      "merge, and deleted after its last use; too small a budget fails at planning, "
                      "naming the smallest that works."),
    click.option("--download-dir", type=click.Path(file_okay=False),
                 help="Where Hub shards are downloaded to and deleted from as the merge goes "
                      "(default with --disk-budget: inside the staging directory beside OUT), not "
                      "the shared Hugging Face cache."),
    click.option("--stream-inputs", is_flag=True, default=None,
                 help="Read Hub tensors by HTTP range requests, a chunk at a time, storing no input "
                      "shard: --disk-budget then counts only the output, so it may be below the "
                      "largest shard. Not with --download-dir."),
    click.option("--executor", type=click.Choice(["local", "ray"]),
                 help="local (default): merge in this process. ray: one Ray task per output shard "
                      "(pip install 'streammerge[ray]'), on the cluster at --ray-address; the "
                      "inputs and OUT must be on a filesystem every node sees (or the inputs on "
                      "the Hub). The output is the same bytes."),
    click.option("--ray-address",
                 help="The Ray cluster to run on (as `ray start --head` prints it; default: "
                      "RAY_ADDRESS, else a cluster started on this machine for the run)."),
    click.option("--shards-per-task", type=click.IntRange(min=1),
                 help="Output shards each Ray task writes (default 1)."),
    click.option("--strict/--lenient", default=None,
                 help="Unknown keys and parameters are errors (--strict) or warnings (--lenient). "
                      "Default: lenient for mergekit configs, strict for plans using streammerge's own keys."),
]


_output_options = [
    click.option("--overwrite", is_flag=True, help="Replace an existing output directory."),
    click.option("--restart", is_flag=True,
                 help="Discard the partial output of an earlier, interrupted run instead of resuming it."),
    mergekit_cli.QUIET_OPTION,
]
_mergekit_options = [mergekit_cli.DEVICE_OPTION, *mergekit_cli.OPTIONS]


def _warn(message: Warning | str, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    click.echo(f"warning: {message}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="streammerge")
def main() -> None:
    """Merge Hugging Face checkpoints one tensor at a time, in bounded memory.

    A plan is a mergekit YAML config (models, slices or modules, base_model, merge_method,
    parameters, dtype, out_dtype, tokenizer_source or tokenizer, chat_template; several documents
    run as mergekit-multi does), optionally
    with streammerge's own keys (output, shard_size, max_memory, chunk_size, compute_dtype, seed,
    device, max_gpu_memory, vocab_policy, select, cache_dir, allow_nonfinite, adapters, adapter_output,
    allow_crimes, copy_tokenizer, write_model_card, calibration, donor). Models are local directories or
    org/name[@revision] on the Hugging Face Hub; model+adapter folds a PEFT LoRA adapter in.

    eval, compare and calibrate run a model one decoder layer at a time (pip install
    'streammerge[eval]'): perplexity and continuations, merges side by side, and the statistics
    the data-aware methods read. check and stats look at models without merging them: whether
    they can be merged (from headers alone) and how far apart they are, per tensor and layer.
    """
    warnings.showwarning = _warn


@main.command(cls=mergekit_cli.MergekitHelp)
@click.argument("plan", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("-o", "--output", "output", type=click.Path(file_okay=False, path_type=Path), help="Output directory (overrides the plan's 'output').")
@add_options(_output_options)
@click.option("--threads", type=click.IntRange(min=1), help="Merge this many chunks at once on the CPU, a thread each (default: torch's thread count, one per core). Reading and writing run in threads of their own.")
@click.option("--stats", "with_stats", is_flag=True,
              help="After the merge, write OUT/merge_stats.json: the output against each input, as "
                   "`streammerge stats INPUT OUT` computes it.")
@add_options(_plan_options)
@add_options(_mergekit_options)
def run(plan: Path, out: Path | None, output: Path | None, overwrite: bool, restart: bool, quiet: bool,
        with_stats: bool, **options: Any) -> None:
    """Merge as PLAN says, into OUT (or -o OUT, or the plan's 'output').

    The output appears only complete. A run that is killed or fails keeps its partial output in
    .OUT.streammerge-partial beside OUT; the same command resumes it. mergekit-yaml's options
    are accepted too (listed last). A file whose root key is merge_config: (a ModelMerger
    config) is merged into its output_path unless OUT is given.
    """
    if out is not None and output is not None and out != output:
        fail(StreamMergeError(f"two outputs given ({out} and -o {output}); give one"))
    overrides = _translated(options, quiet)
    try:
        if with_stats and any(isinstance(d, dict) and d.get("adapter_output") for d in read_documents(plan)):
            raise PlanError(f"{plan}: --stats compares a merged model with its inputs, but adapter_output "
                            "writes an adapter; drop --stats or adapter_output")
        result = merge(plan, output or out, overwrite=overwrite, restart=restart, quiet=quiet, **overrides)
    except StreamMergeError as e:
        fail(e)
    _report(result, quiet)
    if with_stats:
        _merge_stats(result, quiet, show=False)


def _merge_stats(result: MergeResult, quiet: bool, show: bool) -> None:
    """OUT/merge_stats.json: the output against each input; with ``show``, their tables printed."""
    try:
        against = output_statistics(result.output, list(result.inputs), progress=not quiet)
        written = write_merge_stats(result.output, against)
    except StreamMergeError as e:
        fail(e)
    for ref, comparison in against.items() if show else ():
        click.echo(f"\n{result.output} against {ref}:\n{summary_table(comparison)}")
    if not quiet:
        click.echo(f"wrote {written}", err=True)


def _translated(options: dict[str, Any], quiet: bool) -> dict[str, Any]:
    """``options`` (streammerge's and mergekit's) as merge(...) overrides; prints the notes and
    applies the thread count."""
    given = {k: options.pop(k) for k in (*mergekit_cli.NAMES, "device") if k in options}
    try:
        translation = mergekit_cli.translate(given, options)
    except StreamMergeError as e:
        fail(e)
    if not quiet:
        for note in translation.notes:
            click.echo(f"note: {note}", err=True)
    if translation.threads is not None:
        import torch

        torch.set_num_threads(translation.threads)
    return translation.overrides


def _report(result: MergeResult, quiet: bool) -> None:
    if quiet:
        return
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    if result.up_to_date:
        click.echo(f"{result.output} already holds this merge's finished output (same plan and inputs; "
                   "streammerge verify checks its bytes); nothing to do. --overwrite merges it again",
                   err=True)
        return
    gpu = ("" if result.peak_gpu_bytes is None
           else f", peak GPU memory {result.peak_gpu_bytes / 2**30:.2f} GiB")
    downloads = ("" if not result.download_seconds else
                 f"; downloads {result.download_seconds:.1f} s, merge {result.merge_seconds:.1f} s")
    off = compiled.unavailable() if result.device.startswith("cpu") else None
    kernels = "" if off is None else f" (compiled kernels off: {off}; torch ops merge instead, at more CPU)"
    click.echo(f"wrote {result.output}: {result.tensors} tensors in {result.shards} shard(s), "
               f"{result.bytes_written / 2**30:.2f} GiB in {result.seconds:.1f} s "
               f"({result.sync_seconds:.1f} s of it syncing to disk{downloads}); "
               f"device: {result.device}{gpu}{kernels}",
               err=True)
    if result.tasks:
        click.echo(task_summary(result.tasks, result.seconds), err=True)


@main.command("plan", cls=mergekit_cli.MergekitHelp)
@click.argument("plan", type=click.Path(dir_okay=False, path_type=Path))
@add_options(_plan_options)
@add_options(_mergekit_options)
def plan_command(plan: Path, **options: Any) -> None:
    """Print PLAN's schedule (tensors, shards, bytes, predicted peak memory) from headers alone;
    takes run's options."""
    from streammerge.schedule import describe

    overrides = _translated(options, quiet=False)
    try:
        sched = schedule(plan, **overrides)
    except StreamMergeError as e:
        fail(e)
    try:
        click.echo(describe(sched))
    finally:
        sched.close()


_HELP = {"help_option_names": ["-h", "--help"]}


@click.command("streammerge-yaml", cls=mergekit_cli.MergekitHelp, context_settings=_HELP)
@click.argument("config_file", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out_path", type=click.Path(file_okay=False, path_type=Path))
@add_options(_output_options)
@add_options(_mergekit_options)
@click.version_option(__version__, prog_name="streammerge-yaml")
def yaml_main(config_file: Path, out_path: Path, overwrite: bool, restart: bool, quiet: bool,
              **options: Any) -> None:
    """mergekit-yaml's command line: merge CONFIG_FILE into OUT_PATH with streammerge.

    Takes every option of mergekit-yaml 0.1.5; the ones streammerge has no use for are accepted
    with a note. As `streammerge run CONFIG_FILE OUT_PATH`, which takes the same options.
    """
    warnings.showwarning = _warn
    overrides = _translated(options, quiet)
    try:
        result = merge(config_file, out_path, overwrite=overwrite, restart=restart, quiet=quiet, **overrides)
    except StreamMergeError as e:
        fail(e)
    _report(result, quiet)


@click.command("streammerge-multi", cls=mergekit_cli.MergekitHelp, context_settings=_HELP)
@click.argument("config_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out-path", type=click.Path(file_okay=False, path_type=Path),
              help="Output of the final merge (the document without a 'name:'); needed when there is one.")
@click.option("-I", "--intermediate-dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Where each named document's merge is written, as DIR/<name>.")
@click.option("--lazy/--no-lazy", default=True,
              help="Keep an output that already holds a model [lazy]; --no-lazy merges every document "
                   "again, replacing it.")
@add_options(_output_options)
@add_options(_mergekit_options)
@click.version_option(__version__, prog_name="streammerge-multi")
def multi_main(config_file: Path, out_path: Path | None, intermediate_dir: Path, lazy: bool, overwrite: bool,
               restart: bool, quiet: bool, **options: Any) -> None:
    """mergekit-multi's command line: the documents of CONFIG_FILE, merged in the order their
    names are used.

    A document with a 'name:' is written to DIR/<name> and later documents use the name as a
    model; the one without a name (at most one) is written to --out-path. Takes every option of
    mergekit-yaml 0.1.5, as streammerge-yaml does.
    """
    warnings.showwarning = _warn
    overrides = _translated(options, quiet)
    try:
        documents = read_documents(config_file)
        stages = mergekit_cli.multi_stages(config_file, documents, out_path, intermediate_dir, lazy)
        results = merge_stages(config_file, stages, overwrite=overwrite or not lazy, restart=restart,
                               quiet=quiet, **overrides)
    except StreamMergeError as e:
        fail(e)
    for result in results:
        if result is not None:
            _report(result, quiet)


@main.command("linear", cls=linear.LayersCommand)
@click.option("--model-a", "--model_a", "model_a", required=True,
              help="Model A: a directory or org/name[@revision].")
@click.option("--model-b", "--model_b", "model_b", required=True,
              help="Model B, of A's architecture and shapes.")
@click.option("--alpha", type=float, required=True,
              help="merged = alpha·A + (1 − alpha)·B, alpha in [0, 1].")
@click.option("--layers", type=int, multiple=True, metavar="N...",
              help="Merge only these decoder layers (--layers 1 2 20); everything else is A's.")
@click.option("--qkv-only", "--qkv_only", "qkv_only", is_flag=True,
              help="With --layers: merge only the query/key/value projections (a fused qkv "
                   "projection whole).")
@click.option("--output-dir", "--output_dir", "output_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Output directory [merged_models/<A>_<B>_alpha0.70[_layers1-2-20][_qkv]].")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
              help="Where the merge kernels run (auto: CUDA when present).")
@click.option("--no-special-fixes", "--no_special_fixes", "no_special_fixes", is_flag=True,
              help="Merge the embedding and lm_head rows of special tokens too (default: they are A's).")
@add_options(_output_options)
def linear_command(model_a: str, model_b: str, alpha: float, layers: tuple[int, ...], qkv_only: bool,
                   output_dir: Path | None, device: str, no_special_fixes: bool, overwrite: bool,
                   restart: bool, quiet: bool) -> None:
    """Merge two models: alpha·A + (1 − alpha)·B, optionally only some layers or their q/k/v.

    The rows of A's special tokens (added tokens marked special, bos/eos/pad/unk) in merged
    embeddings and lm_head stay A's unless --no-special-fixes. Runs the native plan it stands for,
    which the output keeps as streammerge_plan.yaml. Ends with the output's statistics against A
    and B (as `streammerge stats` prints them), also written to OUT/merge_stats.json.
    """
    try:
        request = linear.translate(model_a, model_b, alpha, list(layers) or None, qkv_only,
                                   not no_special_fixes, output_dir, device)
        click.echo(request.architecture.describe())
        for note in () if quiet else request.notes:
            click.echo(f"note: {note}", err=True)
        result = merge(request.plan, request.output, overwrite=overwrite, restart=restart, quiet=quiet)
    except StreamMergeError as e:
        fail(e)
    _report(result, quiet)
    _merge_stats(result, quiet, show=True)


@main.command("verify")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
def verify_command(out: Path) -> None:
    """Check a merged model: shard headers, the index, and every tensor's sha256 against the run's manifest."""
    from streammerge.verify import verify

    problems, checked = verify(out)
    for problem in problems:
        click.echo(f"error: {problem}", err=True)
    if problems:
        sys.exit(1)
    click.echo(f"ok: {out}: {checked['shards']} shard(s), {checked['tensors']} tensors, "
               f"{checked['bytes'] / 2**30:.2f} GiB match the manifest")


@main.command()
def methods() -> None:
    """List merge methods and their parameters."""
    for name in method_names():
        m = get_method(name)
        click.echo(f"{name}  ({m.paper})")
        for p in m.params:
            default = "required" if p.required else f"default {p.default}"
            click.echo(f"    {p.name:<10} {'per model' if p.per_model else 'global':<9} {default:<14} {p.doc}")


main.add_command(eval_command)
main.add_command(calibrate_command)
main.add_command(compare_command)
main.add_command(check_command)
main.add_command(stats_command)
main.add_command(extract_lora_command)
main.add_command(moe_command)

if __name__ == "__main__":
    main()
