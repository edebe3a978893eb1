"""``streammerge verify``: headers, the index and every tensor's sha256 against the run's manifest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import streammerge
from checkpoint_builder import Family
from streammerge.cli import main
from streammerge.io.reader import ShardReader


@pytest.fixture
def merged(fp32_family: Family, tmp_path: Path) -> Path:
    plan = {"merge_method": "ties", "base_model": str(fp32_family.base),
            "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}} for m in fp32_family.models]}
    streammerge.merge(plan, tmp_path / "out", quiet=True, shard_size=40_000)
    return tmp_path / "out"


def _verify(out: Path) -> tuple[int, list[str]]:
    result = CliRunner().invoke(main, ["verify", str(out)])
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return result.exit_code, result.output.strip().splitlines()


def _second_tensor(shard: Path) -> tuple[str, int]:
    reader = ShardReader(shard)
    entry = sorted(reader.entries.values(), key=lambda e: e.offset)[1]
    reader.close()
    return entry.name, entry.offset


def test_a_finished_merge_verifies(merged: Path, fp32_family: Family) -> None:
    code, lines = _verify(merged)
    shards = len(list(merged.glob("*.safetensors")))
    assert code == 0 and shards > 1
    assert lines == [f"ok: {merged}: {shards} shard(s), {len(fp32_family.tensors[fp32_family.base])} tensors, 0.00 GiB match the manifest"]


def test_a_flipped_byte_is_found_and_named(merged: Path) -> None:
    shard = sorted(merged.glob("*.safetensors"))[1]
    name, offset = _second_tensor(shard)
    with open(shard, "r+b") as f:
        f.seek(offset + 5)
        byte = f.read(1)
        f.seek(offset + 5)
        f.write(bytes([byte[0] ^ 0x10]))
    code, lines = _verify(merged)
    assert code == 1
    assert lines == [f"error: {shard}: tensor {name!r}: sha256 mismatch (the data changed after it was written)"]


def test_a_truncated_shard_is_found_and_named(merged: Path) -> None:
    shard = sorted(merged.glob("*.safetensors"))[0]
    reader = ShardReader(shard)
    last = max(reader.entries.values(), key=lambda e: e.offset)
    reader.close()
    os.truncate(shard, shard.stat().st_size - 10)
    code, lines = _verify(merged)
    assert code == 1 and len(lines) == 1
    assert lines[0].startswith(f"error: {shard}: tensor {last.name!r}: data ends at byte") and "truncated" in lines[0]


def test_index_problems_are_each_named(merged: Path) -> None:
    index_path = merged / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    dropped = sorted(index["weight_map"])[0]
    held_by = index["weight_map"].pop(dropped)
    index["metadata"]["total_size"] += 4
    moved = sorted(index["weight_map"])[-1]
    elsewhere = next(s for s in sorted(set(index["weight_map"].values())) if s != index["weight_map"][moved])
    actual, index["weight_map"][moved] = index["weight_map"][moved], elsewhere
    index_path.write_text(json.dumps(index))
    code, lines = _verify(merged)
    assert code == 1
    assert sorted(lines) == sorted([
        f"error: {index_path}: tensor {moved!r} is mapped to {elsewhere} but is in {actual}",
        f"error: {index_path}: tensor {dropped!r} (in {held_by}) is missing from weight_map",
        f"error: {index_path}: metadata.total_size is {index['metadata']['total_size']}, "
        f"the shards hold {index['metadata']['total_size'] - 4} bytes of tensors",
    ])


def test_a_missing_manifest_or_an_extra_shard_is_an_error(merged: Path) -> None:
    (merged / "model-99999-of-99999.safetensors").write_bytes(sorted(merged.glob("*.safetensors"))[0].read_bytes())
    code, lines = _verify(merged)
    assert code == 1 and any("model-99999-of-99999.safetensors: not in the manifest" in line for line in lines)
    (merged / "streammerge-manifest.json").unlink()
    code, lines = _verify(merged)
    assert code == 1 and lines == [f"error: {merged}/streammerge-manifest.json: missing (the run that wrote {merged} recorded no checksums)"]


def test_verify_in_a_real_process_exits_nonzero_without_a_traceback(merged: Path) -> None:
    shard = sorted(merged.glob("*.safetensors"))[-1]
    name, offset = _second_tensor(shard)
    with open(shard, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff\xff")
    proc = subprocess.run([sys.executable, "-m", "streammerge", "verify", str(merged)], capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {shard}: tensor {name!r}: sha256 mismatch (the data changed after it was written)"]
