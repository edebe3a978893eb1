"""The checksum manifest a merge writes into its output, and ``verify``, which checks an output against it.

``streammerge-manifest.json`` holds, per shard, its size, its header's sha256, every tensor's sha256
and a shard checksum composed of those (``io.digest.shard_digest``), and the merge's identity (the
journal's: version, plan, inputs, layout). The per-tensor checksums come from the resume journal,
so a resumed run writes the same manifest as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from streammerge.errors import StreamMergeError
from streammerge.io.digest import shard_digest
from streammerge.io.layout import INDEX
from streammerge.io.reader import ShardReader
from streammerge.journal import Entry, identity
from streammerge.schedule import Schedule

MANIFEST = "streammerge-manifest.json"


def manifest(schedule: Schedule, entries: dict[str, Entry], merge: dict[str, Any]) -> dict[str, Any]:
    """The manifest of a finished run: ``entries`` holds every tensor's journal entry, ``merge`` the
    journal's identity of the run."""
    shards = {}
    for s in schedule.shards:
        tensors = {name: entries[name].sha256 for name in s.tensors}  # in file order: the schedule placed them so
        header = hashlib.sha256(s.header).hexdigest()
        shards[s.filename] = {"size": s.size, "header_sha256": header,
                              "sha256": shard_digest(header, list(tensors.values())), "tensors": tensors}
    return {"format": "streammerge-manifest/1", "shards": shards, "merge": merge}


def holds_merge(path: Path, schedule: Schedule) -> bool:
    """Whether ``path`` is this schedule's finished output: a run that was stopped after its output
    was committed, before it could report success, is then complete, and running it again is not
    an error. (Its bytes are checked by ``verify``, not here.)"""
    try:
        return json.loads((path / MANIFEST).read_text()).get("merge") == identity(schedule)
    except (OSError, ValueError, AttributeError):
        return False


def verify(path: Path) -> tuple[list[str], dict[str, int]]:
    """Every problem found in the model at ``path`` (one line each, naming the shard and tensor),
    and what was checked (``shards``, ``tensors``, ``bytes``)."""
    if not path.is_dir():
        return [f"{path}: not a directory"], {}
    listed = _manifest(path)
    if isinstance(listed, str):
        return [listed], {}
    problems: list[str] = []
    weights: dict[str, str] = {}  # tensor -> shard holding it
    unreadable: set[str] = set()
    checked = {"shards": 0, "tensors": 0, "bytes": 0}
    for name in sorted(set(listed) | {p.name for p in path.glob("*.safetensors")}):
        shard_problems, tensors = _check_shard(path / name, listed.get(name))
        problems += shard_problems
        if tensors is None:
            unreadable.add(name)
            continue
        for tensor, nbytes in tensors.items():
            if tensor in weights:
                problems.append(f"{path / name}: tensor {tensor!r} is also in {weights[tensor]}")
            weights[tensor] = name
            checked["bytes"] += nbytes
        checked["shards"] += 1
        checked["tensors"] += len(tensors)
    problems += _check_index(path, weights, checked["bytes"], unreadable)
    return problems, checked


def _manifest(path: Path) -> dict[str, Any] | str:
    """The manifest's shards, or the problem with it."""
    file = path / MANIFEST
    try:
        data = json.loads(file.read_text())
        shards = data["shards"]
        if not isinstance(shards, dict) or not all(isinstance(v, dict) for v in shards.values()):
            raise TypeError("'shards' is not an object of objects")
    except FileNotFoundError:
        return f"{file}: missing (the run that wrote {path} recorded no checksums)"
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        return f"{file}: not a valid manifest ({e})"
    return shards


def _check_shard(path: Path, listed: dict[str, Any] | None) -> tuple[list[str], dict[str, int] | None]:
    """The problems of one shard, and its tensors' sizes (None when it cannot be read)."""
    if listed is None:
        return [f"{path}: not in the manifest (a file that the merge did not write)"], {}
    if not path.is_file():
        return [f"{path}: missing"], None
    try:
        reader = ShardReader(path)
    except StreamMergeError as e:  # truncated, or a header that does not parse: named by the reader
        return [str(e)], None
    try:
        problems = []
        if reader.size != listed.get("size"):
            problems.append(f"{path}: {reader.size} bytes, the manifest says {listed.get('size')} (truncated or appended to)")
        if reader.header_sha256 != listed.get("header_sha256"):
            problems.append(f"{path}: header differs from the one written (sha256 mismatch)")
        tensors = listed.get("tensors") or {}
        for name in sorted(set(tensors) - set(reader.entries)):
            problems.append(f"{path}: tensor {name!r} is in the manifest but not in the shard")
        by_offset = sorted(reader.entries.values(), key=lambda e: e.offset)
        shas = []
        for e in by_offset:
            shas.append(reader.sha256(e.name))
            if e.name not in tensors:
                problems.append(f"{path}: tensor {e.name!r} is not in the manifest")
            elif shas[-1] != tensors[e.name]:
                problems.append(f"{path}: tensor {e.name!r}: sha256 mismatch (the data changed after it was written)")
        if not problems and shard_digest(reader.header_sha256, shas) != listed.get("sha256"):
            problems.append(f"{path}: shard checksum differs from the manifest's")
        return problems, {e.name: e.nbytes for e in by_offset}
    finally:
        reader.close()


def _check_index(path: Path, weights: dict[str, str], total: int, unreadable: set[str]) -> list[str]:
    """The index against the shards; tensors mapped to shards that could not be read were reported with them."""
    index = path / INDEX
    if not index.is_file():
        shards = set(weights.values())
        return [] if shards <= {"model.safetensors"} else [f"{index}: missing, but the model has {len(shards)} shards"]
    try:
        data = json.loads(index.read_text())
        weight_map, declared = data["weight_map"], data["metadata"]["total_size"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        return [f"{index}: not a valid index ({e})"]
    problems = []
    for tensor, shard in sorted(weight_map.items()):
        if shard in unreadable:
            continue
        if tensor not in weights:
            problems.append(f"{index}: tensor {tensor!r} is mapped to {shard}, which does not hold it")
        elif weights[tensor] != shard:
            problems.append(f"{index}: tensor {tensor!r} is mapped to {shard} but is in {weights[tensor]}")
    for tensor in sorted(set(weights) - set(weight_map)):
        problems.append(f"{index}: tensor {tensor!r} (in {weights[tensor]}) is missing from weight_map")
    if declared != total and not unreadable:
        problems.append(f"{index}: metadata.total_size is {declared}, the shards hold {total} bytes of tensors")
    return problems
