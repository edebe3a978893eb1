"""Hub merges with --stream-inputs: tensors read by HTTP range requests a chunk at a time, no input
shard stored; retries resumed mid-range; the disk budget counts the output alone. Against the test
Hub (tests/hub_server.py) on 127.0.0.1."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import streammerge
from checkpoint_builder import Family
from hub_server import HubServer, Request, hub  # noqa: F401  (the fixture)
from streammerge.cli import main
from streammerge.errors import PlanError
from test_hub_budget import _budgeted, _DiskWatch, _local
from test_hub_stream import REPOS, _push, _shards

CHILD = Path(__file__).with_name("crash_child.py")
CHUNK = 512  # elements per chunk: every matrix of the test models is read in several chunks
FILE = "model-00002-of-00003.safetensors"


def _streamed(*models: str, **native: object) -> dict:
    return _budgeted(*models, chunk_size=CHUNK, stream_inputs=True, **native)


def _range(r: Request) -> tuple[int, int]:
    first, last = r.range.removeprefix("bytes=").split("-")
    return int(first), int(last)


def _tensor_reads(hub: HubServer, family: Family, since: int = 0) -> list[Request]:
    """The shard requests from the ``since``-th logged one on that read tensor bytes (past the
    header: planning's reads are before)."""
    starts = {p.name: 8 + int.from_bytes(p.read_bytes()[:8], "little")
              for p in family.base.glob("*.safetensors")}
    return [r for r in hub.requests()[since:] if str(r.file).endswith(".safetensors")
            and (r.range is None or _range(r)[0] >= starts[r.file])]


def test_a_streamed_merge_matches_local_reading_ranges_only(hub: HubServer, sharded_family: Family,
                                                           tmp_path: Path) -> None:
    _push(hub, sharded_family)
    local = _local(sharded_family, tmp_path / "local")
    models = (str(sharded_family.base), *map(str, sharded_family.models[:2]))
    streammerge.merge(_streamed(*models), tmp_path / "local-streamed", quiet=True)
    assert _shards(tmp_path / "local-streamed") == local  # local inputs: read in place, as before
    assert not hub.log
    out = tmp_path / "hub"
    watch = _DiskWatch(out)
    try:
        result = streammerge.merge(_streamed(*REPOS), out, quiet=True)
    finally:
        watch.stop()
    assert _shards(out) == local
    sizes = {p.name: p.stat().st_size for p in sharded_family.base.glob("*.safetensors")}
    reads = _tensor_reads(hub, sharded_family)
    shard_gets = [r for r in hub.requests() if str(r.file).endswith(".safetensors")]
    assert all(r.method == "GET" and r.range is not None and r.status == 206 for r in shard_gets)
    assert all(r.sent == _range(r)[1] - _range(r)[0] + 1 < sizes[r.file] for r in reads)
    tensors = sum(len(result.inputs) for _ in range(result.tensors))
    assert len(reads) > tensors  # chunks: a tensor's rows read by several requests
    assert watch.peak_downloads == 0 and not list(tmp_path.rglob("*.partial"))
    assert not list((tmp_path / "hf_home").rglob("*.safetensors"))  # only the small files cached
    assert 0 < result.download_seconds and 0 < result.merge_seconds


def test_a_500_and_a_drop_mid_range_are_retried_and_resumed(hub: HubServer, sharded_family: Family,
                                                            tmp_path: Path) -> None:
    _push(hub, sharded_family)
    starts = {p.name: 8 + int.from_bytes(p.read_bytes()[:8], "little")
              for p in sharded_family.base.glob("*.safetensors")}

    def tensor_read(repo: str):
        return lambda r: (r.path.startswith(f"/{repo}/") and r.file == FILE and r.range is not None
                          and _range(r)[0] > starts[FILE])  # a tensor's bytes, after the first

    hub.on(tensor_read("acme/ft1"), lambda: hub.fail(FILE, 2))
    hub.on(tensor_read("acme/ft2"), lambda: hub.drop(FILE, 100))
    out = tmp_path / "hub"
    streammerge.merge(_streamed(*REPOS), out, quiet=True)
    assert _shards(out) == _local(sharded_family, tmp_path / "local")
    reads = _tensor_reads(hub, sharded_family)
    # the engine reads two chunks at once: a retry is the next request for the same bytes, not the
    # next request
    failed = [k for k, r in enumerate(reads) if r.status == 500]
    assert len(failed) == 2
    for k in failed:  # each failed range is asked for again and served
        assert any((r.repo, r.range, r.status) == (reads[k].repo, reads[k].range, 206) for r in reads[k + 1:])
    dropped = next(k for k, r in enumerate(reads) if r.sent < _range(r)[1] - _range(r)[0] + 1
                   and r.status == 206)
    first, last = _range(reads[dropped])
    assert reads[dropped].sent == 100 and reads[dropped].repo == "acme/ft2"
    again = next(r for r in reads[dropped + 1:] if (r.repo, r.file, _range(r)[1]) == ("acme/ft2", FILE, last))
    assert _range(again) == (first + 100, last)


def test_a_budget_that_holds_only_the_output_needs_stream_inputs(
        hub: HubServer, sharded_family: Family, tmp_path: Path) -> None:
    _push(hub, sharded_family)
    sched = streammerge.schedule(_streamed(*REPOS))
    try:
        output = sched.write_bytes
    finally:
        sched.close()
    largest = max(p.stat().st_size for p in sharded_family.base.glob("*.safetensors"))
    downloaded = {k: v for k, v in _streamed(*REPOS).items() if k != "stream_inputs"}
    with pytest.raises(PlanError) as e:  # without it, the shards need room too
        streammerge.merge({**downloaded, "disk_budget": output + largest - 1}, tmp_path / "out",
                          quiet=True)
    assert "or --stream-inputs (no input shard stored)" in str(e.value), str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(PlanError) as e:
        streammerge.schedule(_streamed(*REPOS, disk_budget=output - 1))
    assert f"({output:,} bytes: the output; --stream-inputs stores no input shard)" in str(e.value)
    out = tmp_path / "hub"
    watch = _DiskWatch(out)
    try:
        streammerge.merge(_streamed(*REPOS, disk_budget=output), out, quiet=True)
    finally:
        watch.stop()
    assert watch.peak_total <= output and watch.peak_downloads == 0
    assert _shards(out) == _local(sharded_family, tmp_path / "local")


def test_the_command_line_streams_and_refuses_a_download_dir(hub: HubServer, sharded_family: Family,
                                                             tmp_path: Path) -> None:
    _push(hub, sharded_family)
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump(_budgeted(*REPOS)))
    shown = CliRunner().invoke(main, ["plan", str(plan), "--stream-inputs", "--disk-budget", "1MB"])
    assert shown.exit_code == 0, shown.output
    assert re.search(r"stream .* read by HTTP range requests, none stored", shown.output)
    assert "disk budget   1,000,000 bytes (output only: --stream-inputs" in shown.output
    refused = CliRunner().invoke(main, ["run", str(plan), str(tmp_path / "out"), "--stream-inputs",
                                        "--download-dir", str(tmp_path / "d")])
    assert refused.exit_code == 1 and "drop one of them" in refused.output
    assert len(refused.output.strip().splitlines()) == 1, refused.output
    run = CliRunner().invoke(main, ["run", str(plan), str(tmp_path / "out"), "--stream-inputs"])
    assert run.exit_code == 0, run.output
    assert _shards(tmp_path / "out") == _local(sharded_family, tmp_path / "local")
    assert not list((tmp_path / "hf_home").rglob("*.safetensors"))


def test_a_killed_streamed_merge_resumes_without_reading_finished_tensors(
        hub: HubServer, sharded_family: Family, tmp_path: Path) -> None:
    _push(hub, sharded_family)
    path, out = tmp_path / "plan.yaml", tmp_path / "hub"
    path.write_text(yaml.safe_dump(_streamed(*REPOS)))
    child = subprocess.run([sys.executable, str(CHILD), str(path), str(out), "record", "5"],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -9, child.stderr
    journal = tmp_path / ".hub.streammerge-partial" / "streammerge-journal.jsonl"
    finished = {json.loads(line)["tensor"] for line in journal.read_text().splitlines()
                if '"tensor"' in line}
    assert len(finished) >= 5
    killed = len(hub.log)
    streammerge.merge(path, out, quiet=True)
    assert _shards(out) == _local(sharded_family, tmp_path / "local")
    sched = streammerge.schedule(_streamed(*REPOS))
    try:  # the byte ranges of the finished tensors, in every input
        done = {(c.shard_of(n).key[0], c.shard_of(n).path.name, c.shard_of(n).entries[n].offset)
                for c in sched.checkpoints for n in finished if n in c.tensors}
    finally:
        sched.close()
    again = {(r.repo, r.file, _range(r)[0]) for r in _tensor_reads(hub, sharded_family, killed)}
    assert done and again and not again & done
