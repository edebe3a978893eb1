"""The resume journal: which output tensors are durably written, so a killed merge goes on where it stopped.

``streammerge-journal.jsonl`` in the staging directory starts with the merge's identity (streammerge
version, plan hash, every input file's size and header sha256, the output layout); each further line
records one finished tensor (name, shard, offset, bytes, sha256) and is appended, and fdatasync'd,
only after the shard holding the tensor was fdatasync'd. A rerun with the same identity re-reads the
tensors the journal names, keeps those whose sha256 still matches and writes everything else; a
different identity is refused, since mixing two merges' tensors would be silently wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streammerge.errors import OutputError
from streammerge.io.digest import sha256_range
from streammerge.io.writer import ShardWriter, fsync_dir, lock_staging
from streammerge.plan.schema import EXECUTION_KEYS
from streammerge.schedule import Schedule, TensorJob

JOURNAL = "streammerge-journal.jsonl"
TASK_JOURNAL = "streammerge-journal-{:05d}.jsonl"  # an executor task's, after its first shard
# Native keys that change how a merge runs but not a byte it writes: a run killed for memory may
# resume with a smaller --max-memory or --max-gpu-memory, one stopped by a NaN input with
# --allow-nonfinite, one short of disk with another --disk-budget or --download-dir, or with
# --stream-inputs (or without it), or under another executor.
_RUN_ONLY_KEYS = {"output", "max_memory", "max_gpu_memory", "chunk_size", "cache_dir",
                  "allow_nonfinite", "disk_budget", "download_dir", "stream_inputs", *EXECUTION_KEYS}


@dataclass(frozen=True)
class Entry:
    """One durably written output tensor."""

    shard: str
    offset: int
    nbytes: int
    sha256: str


def identity(schedule: Schedule) -> dict[str, Any]:
    """What must not change for a partial output to be resumed."""
    from streammerge import __version__

    plan = schedule.plan.model_dump(mode="json", exclude=_RUN_ONLY_KEYS)
    layout = hashlib.sha256()
    for s in schedule.shards:
        layout.update(s.filename.encode() + b"\0" + s.header)
    out = {
        "streammerge": __version__,
        "plan": hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest(),
        "inputs": _inputs(schedule),
        "layout": layout.hexdigest(),
    }
    statistics = {str(st.directory.path): st.fingerprint() for st in schedule.statistics if st is not None}
    return out | {"statistics": statistics} if statistics else out  # calibration statistics the merge read


def _inputs(schedule: Schedule) -> dict[str, dict[str, list]]:
    """Per input directory, its files' sizes and header hashes (models under adapters share a
    directory: their adapters' files are added to it)."""
    inputs: dict[str, dict[str, list]] = {}
    for c in schedule.checkpoints:
        inputs.setdefault(str(c.path), {}).update({f: list(v) for f, v in c.fingerprint().items()})
    return {path: dict(sorted(files.items())) for path, files in inputs.items()}


def identity_change(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """What differs between a journal's identity and this run's, in words; None if nothing."""
    if old.get("streammerge") != new["streammerge"]:
        return f"it was started by streammerge {old.get('streammerge')}, this is {new['streammerge']}"
    if old.get("plan") != new["plan"]:
        return "the plan changed since it was started"
    inputs = old.get("inputs") or {}
    for path, files in new["inputs"].items():
        if path not in inputs:
            return f"input {path} was not part of it"
        for name, (size, sha) in files.items():
            was = inputs[path].get(name)
            if was is None or was[0] != size:
                return f"input {path}/{name} changed (size {was[0] if was else 'absent'} then, {size} now)"
            if was[1] != sha:
                return f"input {path}/{name} changed (its header differs)"
    if set(inputs) != set(new["inputs"]):
        return "its inputs differ from the plan's"
    if old.get("statistics") != new.get("statistics"):
        return "the calibration statistics it read changed"
    if old.get("layout") != new["layout"]:
        return "the output layout changed"
    return None


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None  # a line cut short by a crash was never acknowledged
    return value if isinstance(value, dict) else None


class Journal:
    """A journal of the staging directory, opened for one run.

    The run's own journal (``task`` None) holds a lock on the directory: one run at a time. An
    executor's task, which that run started, keeps a journal of its own beside it
    (``streammerge-journal-NNNNN.jsonl``, after its first shard): tasks never append to one file
    together. Whichever journal a run opens, the tensors recorded in any of them count as
    written, so a merge may resume under another executor or another grouping of shards."""

    def __init__(self, staging: Path, schedule: Schedule, task: int | None = None):
        self.path = staging / (JOURNAL if task is None else TASK_JOURNAL.format(task + 1))
        self._lock = None if task is not None else lock_staging(staging)
        try:
            self.identity = ident = identity(schedule)
            records = {p: _records(p, staging, ident) for p in journal_files(staging)}
            self.entries = _resumable(staging, records, schedule)
            # Rewritten compactly and atomically (a torn last line, or a tensor that no longer
            # checks out, must not stay in it), then appended to. What it recorded of tensors
            # this run does not write (another task's) is kept as it was.
            kept = [r for r in records.get(self.path, {}).values() if r["tensor"] not in
                    {j.name for j in schedule.jobs}]
            fresh = self.path.with_name(self.path.name + ".new")
            lines = [ident] + [{"tensor": n, **vars(e)} for n, e in self.entries.items()] + kept
            fresh.write_text("".join(json.dumps(x, sort_keys=True) + "\n" for x in lines))
            self._fd = os.open(fresh, os.O_WRONLY | os.O_APPEND)
            os.fdatasync(self._fd)
            os.rename(fresh, self.path)
            fsync_dir(staging)
        except BaseException:
            if self._lock is not None:
                os.close(self._lock)
            raise

    @property
    def finished(self) -> frozenset[str]:
        return frozenset(self.entries)

    def record(self, job: TensorJob, writer: ShardWriter) -> None:
        """Journal ``job`` as finished: its shard is made durable first, then the line."""
        writer.sync()
        entry = Entry(writer.path.name, job.offset, job.out_bytes, writer.sha256(job.offset, job.out_bytes))
        line = memoryview((json.dumps({"tensor": job.name, **vars(entry)}, sort_keys=True) + "\n").encode())
        while line:  # a nearly full disk may take part of it: the rest, or ENOSPC, follows
            line = line[os.write(self._fd, line):]
        os.fdatasync(self._fd)
        self.entries[job.name] = entry

    def close(self) -> None:
        """Release the journal and the lock (the file stays, for a later run to resume from)."""
        os.close(self._fd)
        if self._lock is not None:
            os.close(self._lock)


def journal_files(staging: Path) -> list[Path]:
    """The run's journal and its tasks', those that exist."""
    return [p for p in (staging / JOURNAL, *sorted(staging.glob(TASK_JOURNAL.replace("{:05d}", "*"))))
            if p.is_file()]


def discard_journals(staging: Path) -> None:
    """Remove every journal: a staging directory without one is started over, never trusted."""
    for p in journal_files(staging):
        p.unlink()


def _records(path: Path, staging: Path, ident: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The tensors ``path`` records, by name, once its identity is checked against ``ident``."""
    lines = path.read_bytes().split(b"\n")
    head = _parse(lines[0])
    if head is None:
        return {}  # killed before the journal's first line was durable: nothing was recorded
    change = identity_change(head, ident)
    if change is not None:
        raise OutputError(f"{staging}: holds a partial merge that cannot be resumed ({change}); "
                          "run with --restart to discard it, or give another output")
    return {rec["tensor"]: rec for rec in map(_parse, lines[1:])
            if rec is not None and isinstance(rec.get("tensor"), str)}


def _resumable(staging: Path, records: dict[Path, dict[str, dict[str, Any]]],
               schedule: Schedule) -> dict[str, Entry]:
    """The schedule's tensors that some journal records and that are still on disk as recorded."""
    entries = {}
    for job in schedule.jobs:
        shard = schedule.shards[job.shard].filename
        for recorded in records.values():
            rec = recorded.get(job.name)
            where = (shard, job.offset, job.out_bytes)
            if rec is None or (rec.get("shard"), rec.get("offset"), rec.get("nbytes")) != where:
                continue
            entry = Entry(shard, job.offset, job.out_bytes, rec.get("sha256"))
            if _on_disk(staging / shard, entry):
                entries[job.name] = entry
                break
    return entries


def _on_disk(path: Path, entry: Entry) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        return sha256_range(fd, entry.offset, entry.nbytes, path) == entry.sha256
    except OutputError:  # the shard ends before the tensor does
        return False
    finally:
        os.close(fd)
