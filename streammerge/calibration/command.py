"""``streammerge calibrate``: the command line over ``calibrate``."""

from __future__ import annotations

import re
import time
from pathlib import Path

import click

from streammerge.calibration.calibrate import calibrate
from streammerge.calibration.collect import INPUT_KINDS
from streammerge.calibration.statsdir import StatsDir
from streammerge.cli_common import Size, add_options, fail
from streammerge.errors import StreamMergeError
from streammerge.evaluation.commands import CACHE_DIR, DATA_SOURCES, DTYPE, SEQLEN, TEXT_FIELD
from streammerge.evaluation.peak import PeakRss


def written_table(path: Path, seconds: float, peak_rss_bytes: int) -> str:
    """What the directory holds and what computing it took."""
    stats = StatsDir(path)
    stored = {tuple(where) for kinds in stats.entries.values() for where in kinds.values()}
    files = {file for file, _ in stored}
    # layer-00007-gram-sqnorm.safetensors, layer-00007-fisher.safetensors, outside-layers-fisher.safetensors
    layers = {m[1] for f in files if (m := re.match(r"layer-(\d+)", f))}
    size = sum(f.stat().st_size for f in path.iterdir())
    p = stats.provenance
    return "\n".join([
        f"model        {p.model}",
        f"statistics   {path}: {', '.join(stats.kinds)} of {len(stats.entries)} weights",
        f"wrote        {len(layers)} layers in {len(files)} files, {len(stored)} tensors, "
        f"{size / 2**20:.2f} MiB",
        f"windows      {p.windows} of {p.protocol['seqlen']} tokens ({p.tokens} tokens), dtype "
        f"{p.protocol['dtype']}",
        f"seconds      {seconds:.1f}",
        f"peak memory  {peak_rss_bytes / 2**30:.2f} GiB",
        f"protocol     {p.protocol['description']}",
    ])


@click.command("calibrate", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model")
@click.option("--data", help="Calibration text: " + DATA_SOURCES)
@click.option("--samples", type=click.IntRange(min=1), default=128, show_default=True,
              help="Windows to calibrate on: the first N (or N drawn at random with --shuffle).")
@add_options([SEQLEN])
@click.option("--shuffle", is_flag=True,
              help="Draw the windows at random (without repeats) instead of taking the first ones.")
@click.option("--seed", type=int, default=0, show_default=True, help="The seed of --shuffle's draw.")
@click.option("--stats", "kinds", default=",".join(INPUT_KINDS), show_default=True,
              help="Statistics to compute, comma-separated: gram (XᵀX/tokens per linear), sqnorm "
                   "(Σ x² per input column), fisher (per-window squared gradients, every weight).")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="The statistics directory to write (one there is replaced).")
@click.option("--max-memory", type=Size(),
              help="Peak memory budget, e.g. 2GiB: activations beyond it spill to a temp file.")
@add_options([DTYPE, TEXT_FIELD, CACHE_DIR])
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def calibrate_command(model: str, data: str | None, samples: int, seqlen: int, shuffle: bool, seed: int,
                      kinds: str, out: Path, max_memory: int | None, dtype: str, text_field: str,
                      cache_dir: str | None, quiet: bool) -> None:
    """Statistics of MODEL's activations on --data, for the data-aware merge methods, computed one
    decoder layer at a time and written per layer to the directory -o.

    MODEL is what a plan takes: a directory, org/name[@revision], or model+adapter. Needs
    transformers: pip install 'streammerge[eval]'.
    """
    started = time.perf_counter()
    try:
        with PeakRss() as peak:
            path = calibrate(model, data, samples=samples, seqlen=seqlen, shuffle=shuffle, seed=seed,
                             kinds=[k.strip() for k in kinds.split(",") if k.strip()], out=out,
                             text_field=text_field, dtype=dtype, max_memory=max_memory, cache_dir=cache_dir,
                             progress=not quiet)
    except StreamMergeError as e:
        fail(e)
    click.echo(written_table(path, time.perf_counter() - started, peak.bytes))
