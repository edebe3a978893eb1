"""The Hub shards a schedule still needs, and fetching them before its merge starts.

Planning opened every shard from its header; a merge downloads only the shards its unfinished
tensors read, at the commit planning resolved. (Budgeted, just-in-time downloads and deleting
consumed shards are the next step: issue 22.)
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from streammerge.sources.hub import HubShard

if TYPE_CHECKING:
    from streammerge.schedule import Schedule


def hub_downloads(schedule: Schedule, finished: frozenset[str] = frozenset()) -> list[HubShard]:
    """The Hub shards not yet local that the tensors not ``finished`` read, in first-read order."""
    found: dict[int, HubShard] = {}
    for job in schedule.jobs:
        if job.name in finished:
            continue
        for src in job.inputs:
            shard = schedule.checkpoints[src.checkpoint].shard_of(src.tensor)
            if isinstance(shard, HubShard) and not shard.downloaded:
                found.setdefault(id(shard), shard)
    return list(found.values())


def download_inputs(schedule: Schedule, finished: frozenset[str] = frozenset()) -> float:
    """Download what ``hub_downloads`` names; the seconds it took."""
    began = time.perf_counter()
    for shard in hub_downloads(schedule, finished):
        shard.download()
    return time.perf_counter() - began
