"""The engine: reads run in a thread a few chunks ahead, and neither that nor the thread count changes a byte."""

from __future__ import annotations

import gc
import math
import os
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import streammerge
from checkpoint_builder import Family
from streammerge.cli import main
from streammerge.engine import SWITCH_INTERVAL, _prefetch_order, _reads_direct, run_schedule
from streammerge.errors import CheckpointError
from streammerge.io import reader as reader_module
from streammerge.io.reader import ShardReader
from streammerge.io.writer import StagedOutput


def _ties(family: Family) -> dict:
    return {"merge_method": "ties", "base_model": str(family.base), "dtype": "float32",
            "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.4}} for m in family.models]}


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


@pytest.mark.parametrize("chunk_size", [32, 10**9])
def test_thread_count_does_not_change_a_byte(fp32_family: Family, tmp_path: Path, chunk_size: int) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump(_ties(fp32_family)))
    for threads in ("1", "2"):
        result = CliRunner().invoke(main, ["run", str(plan), str(tmp_path / threads), "-q", "--threads", threads,
                                           "--chunk-size", str(chunk_size)])
        assert result.exit_code == 0, result.output
    assert _shards(tmp_path / "1") == _shards(tmp_path / "2")


def _linear(family: Family) -> dict:
    return {"merge_method": "linear", "dtype": "float32",
            "models": [{"model": str(m), "parameters": {"weight": 1.0}}
                       for m in (family.base, *family.models)]}


@pytest.mark.parametrize("method", [_ties, _linear])  # two passes over each matrix, and one
def test_a_read_failing_in_the_reader_thread_is_raised_and_stops_the_run(
        fp32_family: Family, tmp_path: Path, method: Callable[[Family], dict]) -> None:
    """A shard cut short after the schedule was built (its header was valid): the reader thread's
    error reaches the caller, names the file, and the run neither hangs nor leaves a thread behind."""
    family = tmp_path / "family"
    shutil.copytree(fp32_family.base.parent, family)
    copied = [family / m.name for m in fp32_family.models]
    plan = method(Family(family / fp32_family.base.name, copied, {}, fp32_family.arch))
    sched = streammerge.schedule(plan, chunk_size=32)
    try:
        victim = sched.checkpoints[1].file_of(sched.jobs[-1].inputs[1].tensor)
        os.truncate(victim, os.path.getsize(victim) // 2)
        staged = StagedOutput(tmp_path / "out", overwrite=False)
        before = threading.active_count()
        with pytest.raises(CheckpointError, match=f"{victim}: unexpected end of file"):
            run_schedule(sched, staged, quiet=True)
        assert threading.active_count() == before
    finally:
        sched.close()


def _rchar() -> int:
    """Bytes this process has read through read/pread calls so far (Linux); mapped reads are not counted."""
    io = Path("/proc/self/io").read_text().splitlines()
    return int(next(line for line in io if line.startswith("rchar")).split()[1])


@pytest.mark.parametrize("chunk_size", [32, 10**9])
def test_merges_on_the_cpu_read_every_pass_into_buffers(fp32_family: Family, tmp_path: Path, chunk_size: int,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """linear reads every input byte once and TIES its matrices of several chunks once per pass, all
    with preads into the reader's buffers (past the page cache where the filesystem allows it):
    nothing is mapped."""
    data = sum(sum(e.nbytes for e in ShardReader(f).entries.values())
               for m in (fp32_family.base, *fp32_family.models) for f in m.glob("*.safetensors"))
    sched = streammerge.schedule(_ties(fp32_family), chunk_size=chunk_size)
    chunked = sum(math.prod(j.shape) * 4 * len(j.inputs) for j in sched.jobs if j.rows > j.rows_per_chunk)
    sched.close()
    assert (chunked > data / 2) == (chunk_size == 32)
    mapped = []
    real = reader_module._mapped
    monkeypatch.setattr(reader_module, "_mapped",
                        lambda fd, offset, n, path: mapped.append(n) or real(fd, offset, n, path))
    for method, passes in ((_linear, 1), (_ties, 2)):
        before = _rchar()
        streammerge.merge(method(fp32_family), tmp_path / method.__name__, quiet=True, chunk_size=chunk_size)
        assert not mapped and _rchar() - before >= data + (passes - 1) * chunked


def test_on_a_gpu_only_tensors_read_once_skip_the_page_cache(fp32_family: Family) -> None:
    """A GPU merge waits on the disk, not the CPU: a tensor read by several passes is read once into
    the page cache and mapped from it; on the CPU every tensor is read into buffers."""
    sched = streammerge.schedule(_ties(fp32_family), chunk_size=32)
    try:
        for job in sched.jobs:
            assert _reads_direct(job, on_gpu=False)
            assert _reads_direct(job, on_gpu=True) == (job.rows <= job.rows_per_chunk), job.name
        assert not all(_reads_direct(job, on_gpu=True) for job in sched.jobs)
    finally:
        sched.close()


def _during_merge(family: Family, tmp_path: Path, probe: Callable[[], object]) -> list:
    """``probe()`` after each tensor of a chunked TIES merge, in the writer thread."""
    seen = []
    sched = streammerge.schedule(_ties(family), chunk_size=32)
    try:
        run_schedule(sched, StagedOutput(tmp_path / "out", overwrite=False), quiet=True,
                     done=lambda job, writer: seen.append(probe()))
    finally:
        sched.close()
    return seen


def test_the_gil_changes_hands_promptly_during_a_merge_only(fp32_family: Family, tmp_path: Path) -> None:
    before = sys.getswitchinterval()
    seen = _during_merge(fp32_family, tmp_path, sys.getswitchinterval)
    assert seen and all(v == pytest.approx(SWITCH_INTERVAL) for v in seen) and SWITCH_INTERVAL < before  # stored in µs
    assert sys.getswitchinterval() == before


def test_the_objects_alive_before_a_merge_are_frozen_for_it_only(fp32_family: Family, tmp_path: Path) -> None:
    """The collector leaves them alone during the merge, and may collect them again after it."""
    seen = _during_merge(fp32_family, tmp_path, gc.get_freeze_count)
    assert seen and min(seen) > 10_000  # torch's import alone leaves more than that
    assert gc.get_freeze_count() == 0


def test_prefetch_looks_past_tiny_tensors_to_the_next_large_one() -> None:
    """A norm merges at once: the matrix after it is queued as the matrix before it starts."""
    order = _prefetch_order([100, 1, 100, 100, 1, 1, 100, 100], ahead=50)
    assert [list(r) for r in order] == [[1, 2], [], [3], [4, 5, 6], [], [], [7], []]


@pytest.mark.parametrize("sizes", [[], [5], [0, 0, 0], [3, 90, 2, 2, 2, 70, 1], [60] * 5])
def test_prefetch_queues_every_later_job_once_in_order_and_never_the_first(sizes: list[int]) -> None:
    order = _prefetch_order(sizes, ahead=50)
    queued = [j for r in order for j in r]
    assert queued == list(range(1, len(sizes)))
    for k in range(len(order)):  # by the time job k starts, job k + 1 has been queued
        assert k + 1 >= len(sizes) or any(k + 1 in q for q in order[:k + 1])
