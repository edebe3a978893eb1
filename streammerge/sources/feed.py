"""Hub shards fetched just in time, within a byte limit, and deleted after their last use.

A ``ShardFeed`` downloads the shards the unfinished jobs read, in the order they are first read,
in a thread of its own, one at a time, each as soon as the bytes already on disk plus its whole
size (reserved when its download starts) fit the limit: prefetching as far as the limit allows
while the merge reads the shards already there. The engine's reader thread calls ``wait(job)``
before it reads a job; the merging thread calls ``done(job)`` once the job's inputs are all read,
and a shard no unfinished job reads any more is deleted. Downloading in first-use order cannot
stall: once a job is done, what is on disk is part of what the next job needs
(``streammerge.sources.budget`` checks that the largest such set fits the limit).

A killed run leaves its files behind; the next run keeps the complete ones it still needs (within
the limit), resumes their ``.partial`` files, and deletes the rest.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from streammerge.errors import CheckpointError
from streammerge.sources.budget import live_bytes
from streammerge.sources.downloads import job_shards
from streammerge.sources.fetch import fetch_file, partial_path
from streammerge.sources.hub import HubShard

if TYPE_CHECKING:
    from streammerge.schedule import Schedule, TensorJob

Key = tuple[str, str, str]  # HubShard.key: (repo, commit, file)


class ShardFeed:
    """The Hub shards of ``jobs`` (in the order they run), downloaded into ``directory``
    (``org--name/<commit>/<file>``) holding at most ``limit`` bytes at once (None: no limit)."""

    def __init__(self, schedule: Schedule, jobs: list[TensorJob], directory: Path,
                 limit: int | None):
        self.jobs = jobs
        self.directory = directory
        self._limit = limit
        self._needs: dict[str, list[Key]] = {}  # job name -> the shards it reads
        self._shards: dict[Key, list[HubShard]] = {}  # every checkpoint's reader of a file
        self._users: dict[Key, int] = {}  # unfinished jobs reading each shard
        for job in jobs:
            keys = []
            for shard in job_shards(schedule, job):
                if shard not in self._shards.setdefault(shard.key, []):
                    self._shards[shard.key].append(shard)
                keys.append(shard.key)
            self._needs[job.name] = list(dict.fromkeys(keys))
            for key in self._needs[job.name]:
                self._users[key] = self._users.get(key, 0) + 1
        self._order = list(self._shards)  # first-use order
        self._held: dict[Key, int] = {}  # bytes on disk (or reserved) per shard
        self._ready: set[Key] = set()
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self.download_seconds = 0.0  # spent downloading, in the feed's thread
        self.wait_seconds = 0.0  # the reader spent waiting for a shard
        self._keep_existing(live_bytes(schedule, jobs))
        self._thread = threading.Thread(target=self._run, name="streammerge-downloads",
                                        daemon=True)
        self._thread.start()

    def path(self, key: Key) -> Path:
        repo, commit, file = key
        return self.directory / repo.replace("/", "--") / commit / file

    def _fits(self, key: Key, size: int) -> bool:
        """Whether ``key`` may hold ``size`` bytes (in place of what it holds now)."""
        held = sum(self._held.values()) - self._held.get(key, 0)
        return self._limit is None or held + size <= self._limit

    def _keep_existing(self, live: list[int]) -> None:
        """What an earlier, killed run left in this run's folders: complete files still needed are
        kept, in first-use order, while they fit, and the partial file of the first shard to fetch,
        to resume; the rest are deleted. ``live``: per job, the shard bytes it needs on disk.

        A kept file is on disk before shards used earlier are fetched: it is kept only if, until
        its first use, it fits beside what each job needs and the files kept before it (else the
        in-order downloads could wait for room that only its own later use frees)."""
        wanted = {p for k in self._order for p in (self.path(k), partial_path(self.path(k)))}
        for folder in {self.path(k).parent for k in self._order}:
            for found in folder.iterdir() if folder.is_dir() else ():
                if found not in wanted and found.is_file():
                    found.unlink()
        first = {}
        for k, job in enumerate(self.jobs):
            for key in self._needs[job.name]:
                first.setdefault(key, k)
        early = [0] * len(live)  # per job, bytes of kept files first used after it
        for key in self._order:
            path, size = self.path(key), self._shards[key][0].size
            room = self._limit is None or all(live[j] + early[j] + size <= self._limit
                                              for j in range(first[key]))
            if path.is_file() and path.stat().st_size == size and room:
                try:
                    for shard in self._shards[key]:
                        shard.attach(path)
                except CheckpointError:  # not the file planned: fetched again
                    for shard in self._shards[key]:
                        shard.detach()
                else:
                    self._held[key] = size
                    self._ready.add(key)
                    for j in range(first[key]):
                        early[j] += size
                    continue
            path.unlink(missing_ok=True)
        fetch = [k for k in self._order if k not in self._ready]
        for key in fetch:
            partial = partial_path(self.path(key))
            if key == fetch[0] and partial.is_file() and self._fits(key, partial.stat().st_size):
                self._held[key] = partial.stat().st_size
            else:
                partial.unlink(missing_ok=True)

    def _run(self) -> None:
        try:
            for key in self._order:
                if key in self._ready:
                    continue
                size = self._shards[key][0].size
                with self._changed:
                    while not self._stop.is_set() and not self._fits(key, size):
                        self._changed.wait()
                    if self._stop.is_set():
                        return
                    self._held[key] = size  # reserved whole before a byte arrives
                began = time.perf_counter()
                snapshot = self._shards[key][0].snapshot
                if not fetch_file(snapshot, key[2], self.path(key), size, self._stop):
                    return
                self.download_seconds += time.perf_counter() - began
                for shard in self._shards[key]:
                    shard.attach(self.path(key))
                with self._changed:
                    self._ready.add(key)
                    self._changed.notify_all()
        except BaseException as e:  # raised where the shard is waited for
            with self._changed:
                self._error = e
                self._changed.notify_all()

    def wait(self, job: TensorJob, stop: threading.Event) -> None:
        """Return once every shard ``job`` reads is on disk, or ``stop`` is set (the reader is
        closing: the shard may never come, when the merge it waits on failed); raise the
        download's error if one failed."""
        began = time.perf_counter()
        with self._changed:
            while not all(k in self._ready for k in self._needs.get(job.name, ())):
                if self._error is not None:
                    raise self._error
                if stop.is_set():
                    break
                self._changed.wait(0.1)
        self.wait_seconds += time.perf_counter() - began

    def done(self, job: TensorJob) -> None:
        """``job``'s inputs are read: delete the shards no unfinished job reads any more."""
        for key in self._needs.pop(job.name, ()):
            self._users[key] -= 1
            if self._users[key] == 0:
                for shard in self._shards[key]:
                    shard.detach()
                self.path(key).unlink()
                with self._changed:
                    self._held.pop(key)
                    self._changed.notify_all()

    def close(self) -> None:
        """Stop downloading; the files stay for a resumed run. Once every job is done they are all
        deleted already, and so are the (empty) folders of this run's shards."""
        with self._changed:
            self._stop.set()
            self._changed.notify_all()
        self._thread.join()
        if all(n == 0 for n in self._users.values()):
            commits = {self.path(k).parent for k in self._order}
            for empty in [*commits, *{c.parent for c in commits}]:  # a repo's after its commits'
                try:
                    empty.rmdir()
                except OSError:  # not empty (files of other runs), or never made
                    pass

    def __enter__(self) -> ShardFeed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
