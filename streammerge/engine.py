"""Run a schedule: for each output tensor, read its inputs chunk by chunk, merge, write.

The engine knows nothing about any method: it runs the method's statistics passes over the row
chunks, then its merge, and writes each merged chunk at its precomputed offset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm import tqdm

from streammerge.io.rows import read_mapped
from streammerge.io.writer import ShardWriter, StagedOutput
from streammerge.methods import Chunk
from streammerge.schedule import Schedule, Source, TensorJob


@dataclass(frozen=True)
class MergeResult:
    output: Path
    tensors: int
    shards: int
    bytes_read: int
    bytes_written: int
    seconds: float
    notes: tuple[str, ...]


def _row_ranges(job: TensorJob) -> Iterator[tuple[int, int]]:
    for start in range(0, job.rows, job.rows_per_chunk):
        yield start, min(start + job.rows_per_chunk, job.rows)


def _read_source(schedule: Schedule, job: TensorJob, src: Source, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of one input; rows past a shorter input's end come from ``inputs[0]``."""
    ckpt = schedule.checkpoints[src.checkpoint]
    if not job.shape:
        return ckpt.read(src.tensor)
    if src.row_map is not None:
        return read_mapped(schedule.checkpoints, src.checkpoint, src.tensor, src.row_map, start, stop, job.load_dtype)
    if src.rows is None or stop <= src.rows:
        return ckpt.read(src.tensor, slice(start, stop))
    own = ckpt.read(src.tensor, slice(start, max(start, src.rows)))
    fill = _read_source(schedule, job, job.inputs[0], max(start, src.rows), stop)
    return torch.cat([own, fill.to(own.dtype)])


def _read(schedule: Schedule, job: TensorJob, start: int, stop: int) -> list[torch.Tensor]:
    out = []
    for src in job.inputs:
        raw = _read_source(schedule, job, src, start, stop)
        if job.method is not None and schedule.plan.compute_dtype == "auto":
            raw = raw.to(job.load_dtype)  # mergekit rounds inputs to `dtype` on load
        out.append(raw.to(job.compute_dtype) if job.method is not None else raw)
    return out


def _chunk(schedule: Schedule, job: TensorJob, tensors: list[torch.Tensor], start: int, stop: int) -> Chunk:
    base = tensors[0] if job.has_base else None
    models = tensors[1:] if job.has_base else tensors
    return Chunk(job.name, job.shape, base, models, job.params, start, stop, schedule.plan.seed, job.model_ids)


def merge_tensor(schedule: Schedule, job: TensorJob, write: Any) -> None:
    """Merge one output tensor, calling ``write(row_start, tensor)`` for each finished chunk."""
    ranges = list(_row_ranges(job))
    cached = _read(schedule, job, *ranges[0]) if len(ranges) == 1 else None  # one chunk: read once for every pass

    def chunks() -> Iterator[Chunk]:
        for start, stop in ranges:
            yield _chunk(schedule, job, cached if cached is not None else _read(schedule, job, start, stop), start, stop)

    if job.method is None:
        for c in chunks():
            write(c.row_start, c.models[0].to(job.out_dtype))
        return
    stats: dict[str, Any] = {}
    for p in job.method.passes_for(job.params):
        totals: dict[str, torch.Tensor] = {}
        last = None
        for c in chunks():
            for key, part in p.collect(c, stats).items():
                totals[key] = totals[key] + part if key in totals else part
            last = c
        stats = p.finish(totals, last, stats)
    for c in chunks():
        write(c.row_start, job.method.merge(c, stats).to(job.out_dtype))


def run_schedule(schedule: Schedule, staged: StagedOutput, quiet: bool = False) -> None:
    """Write every shard of the schedule into the staging directory."""
    writers = [ShardWriter(staged.path(s.filename), s.header, s.size) for s in schedule.shards]
    try:
        with tqdm(total=schedule.write_bytes, unit="B", unit_scale=True, unit_divisor=1024, disable=quiet,
                  desc="merging", dynamic_ncols=True) as bar:
            for job in schedule.jobs:
                row_bytes = math.prod(job.shape[1:]) * job.out_dtype.itemsize if job.shape else 0
                writer = writers[job.shard]

                def write(row_start: int, tensor: torch.Tensor) -> None:
                    writer.write(job.offset + row_start * row_bytes, tensor)
                    bar.update(tensor.numel() * tensor.element_size())

                merge_tensor(schedule, job, write)
                for src in job.inputs:
                    schedule.checkpoints[src.checkpoint].release(src.tensor)
            bar.update(sum(len(s.header) for s in schedule.shards))
    finally:
        for w in writers:
            w.close()
