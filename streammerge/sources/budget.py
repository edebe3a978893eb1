"""The disk budget: in which order to merge, and whether the downloads and the output fit.

Under ``disk_budget`` each Hub shard is downloaded before the first tensor that reads it and deleted
after the last, so the shards on disk at tensor ``j`` are those whose span of use covers ``j``
(``live_peak``). The schedule's order (by layer, then by the first input's file and offset) mostly
follows the shards already; where ordering the tensors by the shards they read holds fewer bytes
at once, that order runs instead (``run_order``). Writes land at offsets planned from the
schedule's order, so the output's bytes do not depend on the order tensors are merged in.

The output counts against the budget when the downloads land on its filesystem: the engine
reserves every output shard in the staging directory when the merge starts and keeps them there
until the finished model is renamed into place, so all of it is on disk throughout. With
``stream_inputs`` nothing is downloaded: the budget counts the output alone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from streammerge.errors import PlanError
from streammerge.sources.downloads import job_shards

if TYPE_CHECKING:
    from streammerge.schedule import Schedule, TensorJob

DOWNLOADS = "downloads"  # the default download folder, inside the staging directory


def live_bytes(schedule: Schedule, jobs: list[TensorJob]) -> list[int]:
    """Per job of ``jobs``, run in this order, the Hub-shard bytes on disk while it runs, each
    shard there from its first reader to its last."""
    first: dict[tuple[str, str, str], int] = {}
    last: dict[tuple[str, str, str], int] = {}
    size: dict[tuple[str, str, str], int] = {}
    for k, job in enumerate(jobs):
        for shard in job_shards(schedule, job):
            first.setdefault(shard.key, k)
            last[shard.key] = k
            size[shard.key] = shard.size
    change = [0] * (len(jobs) + 1)
    for key, s in size.items():
        change[first[key]] += s
        change[last[key] + 1] -= s
    live, total = [], 0
    for c in change[:-1]:
        total += c
        live.append(total)
    return live


def live_peak(schedule: Schedule, jobs: list[TensorJob]) -> int:
    """The most Hub-shard bytes on disk at once when ``jobs`` run in this order."""
    return max(live_bytes(schedule, jobs), default=0)


def run_order(schedule: Schedule) -> list[TensorJob]:
    """The schedule's jobs in the order to merge them under a disk budget: the schedule's, unless
    ordering by the Hub shards read holds fewer bytes at once. Then a job runs with the last of
    its shards to arrive (shards ranked by first use in the schedule's order); jobs reading none
    come first, while the first download runs."""
    jobs = list(schedule.jobs)
    rank: dict[tuple[str, str, str], int] = {}
    for job in jobs:
        for shard in job_shards(schedule, job):
            rank.setdefault(shard.key, len(rank))

    def key(k: int) -> tuple[int, int, int]:
        ranks = [rank[s.key] for s in job_shards(schedule, jobs[k])] or [-1]
        return max(ranks), min(ranks), k

    by_shard = [jobs[k] for k in sorted(range(len(jobs)), key=key)]
    return by_shard if live_peak(schedule, by_shard) < live_peak(schedule, jobs) else jobs


def _device(path: Path) -> int:
    """The filesystem ``path`` is (or would be created) on."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return os.stat(path).st_dev


def _output_counts(schedule: Schedule, download_dir: Path | None) -> bool:
    """Whether the output's bytes count against the budget: the downloads land on its filesystem
    (the default folder, inside the staging directory, always does; an unknown output is assumed
    to)."""
    output = schedule.plan.output
    if download_dir is None or output is None:
        return True
    return _device(download_dir) == _device(Path(output).expanduser().parent)


def download_limit(schedule: Schedule) -> int | None:
    """Bytes the downloads may hold at once under the plan's ``disk_budget`` (None without one);
    a ``PlanError`` naming the smallest budget that works when it is too small."""
    plan = schedule.plan
    if plan.disk_budget is None:
        return None
    download_dir = None if plan.download_dir is None else Path(plan.download_dir).expanduser()
    streamed = plan.stream_inputs
    output = schedule.write_bytes if streamed or _output_counts(schedule, download_dir) else 0
    peak = 0 if streamed else live_peak(schedule, run_order(schedule))
    need = peak + output
    if need > plan.disk_budget:
        if streamed:
            parts, elsewhere = "the output; --stream-inputs stores no input shard", ""
        else:
            parts = f"{peak:,} of Hub shards needed at once" + (
                f" + {output:,} of output on the same filesystem" if output else "")
            elsewhere = ", or a --download-dir on another filesystem" if output else ""
            if plan.disk_budget >= schedule.write_bytes:  # the output alone fits: stream the rest
                elsewhere += ", or --stream-inputs (no input shard stored)"
        raise PlanError(f"disk_budget (--disk-budget) {plan.disk_budget:,} bytes is too small for "
                        f"this merge; the smallest that works is {_mib(need)} ({need:,} bytes: "
                        f"{parts}): pass --disk-budget {_mib(need)} or more{elsewhere}")
    return plan.disk_budget - output


def _mib(n: int) -> str:
    return f"{-(-n // 2**20)}MiB"


def describe_budget(schedule: Schedule) -> list[str]:
    """``streammerge plan``'s line for the disk budget (none without one)."""
    limit = download_limit(schedule)
    if limit is None:
        return []
    if schedule.plan.stream_inputs:
        return [f"disk budget   {schedule.plan.disk_budget:,} bytes (output only: --stream-inputs "
                f"stores no input shard): the output needs {schedule.write_bytes:,}"]
    peak = live_peak(schedule, run_order(schedule))
    counted = "output counted" if limit < schedule.plan.disk_budget else "output elsewhere"
    return [f"disk budget   {schedule.plan.disk_budget:,} bytes ({counted}): downloads hold at "
            f"most {limit:,}, {peak:,} needed at once; each shard deleted after its last use"]
