"""The local executor: a schedule's tensors merged in this process (``streammerge.engine``), its
Hub inputs downloaded first, just in time under a disk budget, or read by range requests."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from streammerge.engine import RunReport, run_schedule
from streammerge.io.writer import StagingDirectory
from streammerge.journal import Journal
from streammerge.schedule import Schedule
from streammerge.sources.budget import DOWNLOADS, download_limit, run_order
from streammerge.sources.downloads import download_inputs, stream_inputs
from streammerge.sources.feed import ShardFeed


def merge_weights(sched: Schedule, staged: StagingDirectory, quiet: bool,
                  journal: Journal) -> tuple[RunReport, float, float]:
    """Download the Hub shards the unfinished tensors read and merge them: all into the cache
    first, or, with a disk budget or a download folder, each just before it is needed and
    deleted after its last use, alongside the merge; or, with ``stream_inputs``, none: the
    merge's reads are range requests. The report, the seconds spent downloading (with
    ``stream_inputs``, in range requests, alongside the merge) and those spent merging (waits
    for a download excluded; with ``stream_inputs``, the merge's wall time, its reads in it)."""
    plan = sched.plan
    own = plan.download_dir is None  # in the staging directory: gone before it becomes the output
    directory = staged.path(DOWNLOADS) if own else Path(plan.download_dir).expanduser()
    remove_stale_downloads(sched, staged)
    if plan.stream_inputs:
        streamed = stream_inputs(sched)
        began = time.perf_counter()
        report = run_schedule(sched, staged, quiet, journal.finished, journal.record)
        return (report, sum(s.stream_seconds for s in streamed),
                time.perf_counter() - began)
    if plan.disk_budget is None and plan.download_dir is None:
        downloading = download_inputs(sched, journal.finished)  # after planning: no plan error waits
        began = time.perf_counter()
        report = run_schedule(sched, staged, quiet, journal.finished, journal.record)
        return report, downloading, time.perf_counter() - began
    jobs = [j for j in run_order(sched) if j.name not in journal.finished]
    began = time.perf_counter()
    with ShardFeed(sched, jobs, directory, download_limit(sched)) as feed:
        report = run_schedule(sched, staged, quiet, journal.finished, journal.record, feed)
    merging = time.perf_counter() - began - feed.wait_seconds
    if own and directory.is_dir():
        directory.rmdir()  # every shard was deleted after its last use
    return report, feed.download_seconds, merging


def remove_stale_downloads(sched: Schedule, staged: StagingDirectory) -> None:
    """Remove the downloads folder a killed run left in the staging directory, unless this run
    downloads into it too."""
    plan = sched.plan
    uses = plan.disk_budget is not None and plan.download_dir is None and not plan.stream_inputs
    if staged.path(DOWNLOADS).is_dir() and not uses:
        shutil.rmtree(staged.path(DOWNLOADS))
