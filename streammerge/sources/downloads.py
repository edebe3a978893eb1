"""The Hub shards a schedule still needs, and fetching them all before its merge starts.

Planning opened every shard from its header; a merge downloads only the shards its unfinished
tensors read, at the commit planning resolved. Without a disk budget they go into the Hugging Face
cache before the merge (``download_inputs``); with one, ``streammerge.sources.feed`` fetches each
just before it is needed and deletes it after its last use; with ``stream_inputs``, none is
downloaded: each read is a range request (``stream_inputs``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from streammerge.sources.hub import HubShard

if TYPE_CHECKING:
    from streammerge.schedule import Schedule, TensorJob


def job_shards(schedule: Schedule, job: TensorJob) -> Iterator[HubShard]:
    """The Hub shards not yet local that ``job`` reads: its inputs', and those of the rows that
    fill a re-indexed vocabulary matrix."""
    reads = [(src.checkpoint, src.tensor) for src in job.inputs]
    reads += [(c, t) for src in job.inputs if src.row_map is not None
              for fill in src.row_map.fills.values() for c, t, _ in fill]
    for c, t in dict.fromkeys(reads):
        shard = schedule.checkpoints[c].shard_of(t)
        if isinstance(shard, HubShard) and not shard.downloaded:
            yield shard


def hub_downloads(schedule: Schedule, finished: frozenset[str] = frozenset(),
                  jobs: Iterable[TensorJob] | None = None) -> list[HubShard]:
    """The Hub shards not yet local that the tensors not ``finished`` read, in first-read order
    (of ``jobs``, by default the schedule's), each file once."""
    found: dict[tuple[str, str, str], HubShard] = {}
    for job in schedule.jobs if jobs is None else jobs:
        if job.name not in finished:
            for shard in job_shards(schedule, job):
                found.setdefault(shard.key, shard)
    return list(found.values())


def stream_inputs(schedule: Schedule) -> list[HubShard]:
    """Have every reader of a Hub shard not yet local that the schedule reads read by HTTP range
    requests from now on (``--stream-inputs``); those readers (a file two checkpoints opened,
    twice)."""
    readers = list({id(s): s for job in schedule.jobs for s in job_shards(schedule, job)}.values())
    for shard in readers:
        shard.stream()
    return readers


def download_inputs(schedule: Schedule, finished: frozenset[str] = frozenset()) -> float:
    """Download what ``hub_downloads`` names into the cache; the seconds it took."""
    began = time.perf_counter()
    for shard in hub_downloads(schedule, finished):
        shard.download()
    return time.perf_counter() - began
