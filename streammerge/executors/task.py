"""One task of a scale-out merge: the tensors of some output shards, merged into the staging
directory the driver created, on whichever machine the task landed.

A task is a pure function of the plan the driver resolved and its shards: it builds the same
schedule from headers (checked: the node must see the inputs the driver saw), merges its shards'
tensors with the local executor's code under the plan's memory budget, and writes them at their
planned offsets. Its journal makes a second attempt (a retry after its worker died, or a later
run) resume where the first stopped; writing the same bytes at the same offsets twice is harmless.
It returns only sizes and checksums, never tensors.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from streammerge.errors import CheckpointError, OutputError
from streammerge.executors.local import merge_weights
from streammerge.io.writer import StagingDirectory
from streammerge.journal import Entry, Journal, identity, identity_change
from streammerge.plan.schema import MergePlan
from streammerge.schedule import build_schedule


@dataclass(frozen=True)
class ShardTask:
    plan: MergePlan  # as the driver resolved it: model references are paths every node sees
    staging: str
    shards: tuple[int, ...]  # indices into the schedule's shards
    identity: dict[str, Any]  # the driver's journal identity of the merge
    threads: int  # chunks merged at once (the task's CPUs)


@dataclass(frozen=True)
class TaskResult:
    shards: tuple[str, ...]  # file names
    sizes: tuple[int, ...]  # of those files, as written
    entries: dict[str, Entry]  # every tensor of the shards, with its sha256
    seconds: float
    bytes_read: int  # input bytes of the shards' tensors
    bytes_written: int
    resumed: int  # tensors an earlier attempt or run had written
    notes: tuple[str, ...]
    peak_rss: int  # bytes, of the process that ran it (a worker runs tasks one after another)
    node: str = ""  # set by the executor: where the task ran
    host: str = ""


def run_task(task: ShardTask) -> TaskResult:
    """Merge ``task``'s shards into the staging directory and describe what is there."""
    began = time.perf_counter()
    torch.set_num_threads(task.threads)
    staging = Path(task.staging)
    if not staging.is_dir():
        raise OutputError(f"{staging}: the staging directory is not visible on this node; with "
                          "--executor ray the output must be on a filesystem every node sees")
    sched = build_schedule(task.plan)
    try:
        change = identity_change(task.identity, identity(sched))
        if change is not None:
            raise CheckpointError(f"this node does not see the merge the driver planned ({change}); with "
                                  "--executor ray every node must see the inputs at the same paths")
        mine = sched.of_shards(task.shards)
        journal = Journal(staging, mine, task=task.shards[0])
        resumed = len(journal.entries)
        try:
            report, _, _ = merge_weights(mine, StagingDirectory(staging), True, journal)
            entries = dict(journal.entries)
        finally:
            journal.close()
        shards = [sched.shards[k] for k in task.shards]
        return TaskResult(tuple(s.filename for s in shards),
                          tuple(os.stat(staging / s.filename).st_size for s in shards), entries,
                          time.perf_counter() - began, mine.read_bytes, sum(s.size for s in shards),
                          resumed, report.notes,
                          resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # KiB on Linux
    finally:
        sched.close()
