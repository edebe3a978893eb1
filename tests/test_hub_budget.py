"""Hub merges within a disk budget: each shard downloaded just before its first use, alongside the
merge, and deleted after its last; retries, resume after a kill, against the test Hub
(tests/hub_server.py) on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

import streammerge
from checkpoint_builder import Arch, Family, base_tensors, write_checkpoint
from hub_server import HubServer, Request, hub  # noqa: F401  (the fixture)
from streammerge.cli import main
from streammerge.errors import OutputError, PlanError, StreamMergeError
from streammerge.sources.budget import live_peak, run_order
from streammerge.sources.fetch import fetch_file, partial_path
from streammerge.sources.hub import HubSnapshot
from test_hub_stream import REPOS, _plan, _push, _shards

CHILD = Path(__file__).with_name("crash_child.py")
SHARD_SIZE = 40_000  # several output shards


def _budgeted(*models: str, **native: object) -> dict:
    return {**_plan(*models), "shard_size": SHARD_SIZE, **native}


def _local(family: Family, out: Path) -> dict[str, bytes]:
    """The shards of the same merge of the local copies of what ``_push`` serves."""
    streammerge.merge(_budgeted(str(family.base), *map(str, family.models[:2])), out, quiet=True)
    return _shards(out)


def _smallest_budget(plan: dict) -> tuple[int, int]:
    """The smallest disk budget ``plan`` runs in, and the output's bytes."""
    sched = streammerge.schedule(plan)
    try:
        return live_peak(sched, run_order(sched)) + sched.write_bytes, sched.write_bytes
    finally:
        sched.close()


class _DiskWatch:
    """Samples, in a thread, the bytes in the staging directory of ``out``: its download folder,
    and those plus the output shards, until stopped (at most 4000 samples)."""

    def __init__(self, out: Path):
        self.staging = out.parent / f".{out.name}.streammerge-partial"
        self.peak_downloads = self.peak_total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for _ in range(4000):
            if self._stop.wait(0.005):
                return
            downloads = _bytes(self.staging / "downloads")
            total = downloads + sum(_bytes(p) for p in self.staging.glob("*.safetensors"))
            self.peak_downloads = max(self.peak_downloads, downloads)
            self.peak_total = max(self.peak_total, total)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _bytes(path: Path) -> int:
    """The size of a file, or of the files under a folder (0 when missing)."""
    files = [str(path)] if path.is_file() else [os.path.join(d, f) for d, _, fs in os.walk(path)
                                                  for f in fs]  # os.walk skips what vanishes
    total = 0
    for f in files:
        try:
            total += os.stat(f).st_size
        except FileNotFoundError:  # deleted since listed
            pass
    return total


def _downloads(hub: HubServer, since: int = 0) -> list[Request]:
    """The weight GETs from the ``since``-th logged request on, but header reads (closed ranges)."""
    return [r for r in hub.requests()[since:] if r.method == "GET"
            and str(r.file).endswith(".safetensors") and (r.range is None or r.range.endswith("-"))]


def _download_of(repo: str, file: str):
    """Matches a first download request (no range) of ``repo``'s ``file``."""
    return lambda r: (r.method == "GET" and r.range is None and r.path.startswith(f"/{repo}/")
                      and r.file == file)


def test_a_budgeted_hub_merge_matches_local_within_the_budget(
        hub: HubServer, sharded_family: Family, tmp_path: Path) -> None:
    _push(hub, sharded_family)
    local = _local(sharded_family, tmp_path / "local")
    budget, output = _smallest_budget(_budgeted(*REPOS))
    inputs = sum(p.stat().st_size for p in sharded_family.base.glob("*.safetensors")) * 3
    assert budget - output < inputs / 2
    hub.bytes_per_second = 1_000_000  # about half a second of downloads, for the watch to see
    out = tmp_path / "hub"
    watch = _DiskWatch(out)
    on_disk: list[list[str]] = []  # when the last shard's download starts: the merge went on
    hub.on(_download_of("acme/ft2", "model-00003-of-00003.safetensors"),
           lambda: on_disk.append([f for _, _, fs in os.walk(watch.staging / "downloads")
                                   for f in fs]))
    try:
        result = streammerge.merge(_budgeted(*REPOS, disk_budget=budget), out, quiet=True)
    finally:
        watch.stop()
    assert _shards(out) == local
    assert 0 < watch.peak_downloads <= budget - output and watch.peak_total <= budget
    assert not (out / "downloads").exists() and not watch.staging.exists()
    assert not list((tmp_path / "hf_home").rglob("*.safetensors"))  # nothing in the shared cache
    assert len(_downloads(hub)) == 9 and result.download_seconds > 0 and result.merge_seconds > 0
    assert on_disk and not [f for f in on_disk[0] if f.startswith("model-00001")]


def test_the_summary_reports_download_merge_and_wall_time(
        hub: HubServer, sharded_family: Family, tmp_path: Path) -> None:
    _push(hub, sharded_family)
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump(_budgeted(*REPOS)))
    downloads = tmp_path / "downloads"
    run = CliRunner().invoke(main, ["run", str(plan), str(tmp_path / "out"), "--disk-budget",
                                    "10MB", "--download-dir", str(downloads)])
    assert run.exit_code == 0, run.output
    assert "syncing to disk; downloads" in run.output and ", merge " in run.output
    assert downloads.is_dir() and not list(downloads.iterdir())  # every shard and folder deleted
    shown = CliRunner().invoke(main, ["plan", str(plan), "--disk-budget", "10MB"])
    assert shown.exit_code == 0, shown.output
    assert "disk budget   10,000,000 bytes (output counted)" in shown.output


def test_a_budget_too_small_fails_at_planning_naming_the_smallest(
        hub: HubServer, sharded_family: Family, tmp_path: Path) -> None:
    _push(hub, sharded_family)
    budget, _ = _smallest_budget(_budgeted(*REPOS))
    planned = len(hub.log)
    with pytest.raises(PlanError) as e:
        streammerge.merge(_budgeted(*REPOS, disk_budget=budget - 1), tmp_path / "out",
                          quiet=True)
    assert f"the smallest that works is 1MiB ({budget:,} bytes: " in str(e.value), str(e.value)
    assert "\n" not in str(e.value) and not _downloads(hub, planned)
    assert not (tmp_path / ".out.streammerge-partial").exists()


def test_500s_and_a_dropped_connection_are_retried_and_resumed(
        hub: HubServer, sharded_family: Family, tmp_path: Path) -> None:
    commits = _push(hub, sharded_family)
    failing, dropped = "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"
    hub.on(_download_of("acme/ft1", failing), lambda: hub.fail(failing, 2))
    hub.on(_download_of("acme/ft2", dropped), lambda: hub.drop(dropped, 10_000))
    out = tmp_path / "hub"
    streammerge.merge(_budgeted(*REPOS, disk_budget="10MB"), out, quiet=True)
    assert _shards(out) == _local(sharded_family, tmp_path / "local")
    ft1 = [r for r in _downloads(hub) if r.repo == "acme/ft1" and r.file == failing]
    assert [r.status for r in ft1] == [500, 500, 200]
    assert all(r.revision == commits[r.repo] for r in _downloads(hub))
    ft2 = [(r.range, r.status, r.sent) for r in _downloads(hub)
           if r.repo == "acme/ft2" and r.file == dropped]
    rest = (sharded_family.models[1] / dropped).stat().st_size - 10_000
    assert ft2 == [(None, 200, 10_000), ("bytes=10000-", 206, rest)]


def test_a_partial_file_left_by_a_killed_run_is_resumed(hub: HubServer, sharded_family: Family,
                                                        tmp_path: Path) -> None:
    commits = _push(hub, sharded_family)
    file = "model-00001-of-00003.safetensors"
    source = (sharded_family.base / file).read_bytes()
    dest = tmp_path / "downloads" / file
    dest.parent.mkdir()
    partial_path(dest).write_bytes(source[:12_345])
    snapshot = HubSnapshot("acme/base", commits["acme/base"], tmp_path)
    assert fetch_file(snapshot, file, dest, len(source))
    assert dest.read_bytes() == source and not partial_path(dest).exists()
    assert [(r.range, r.status) for r in _downloads(hub)] == [("bytes=12345-", 206)]


def test_a_timeout_is_retried(hub: HubServer, sharded_family: Family, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    commits = _push(hub, sharded_family)
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 0.5)
    file = "model-00001-of-00003.safetensors"
    hub.on(_download_of("acme/base", file), lambda: time.sleep(1.5))  # no answer in time
    dest = tmp_path / "downloads" / file
    assert fetch_file(HubSnapshot("acme/base", commits["acme/base"], tmp_path), file, dest,
                      (sharded_family.base / file).stat().st_size)
    assert dest.read_bytes() == (sharded_family.base / file).read_bytes()
    for _ in range(100):  # the first request is logged once its handler wakes up
        if len(_downloads(hub)) == 2:
            break
        time.sleep(0.05)
    assert [r.range for r in _downloads(hub)] == [None, None]  # nothing received before the retry


def test_a_download_that_cannot_be_written_names_its_file(hub: HubServer, sharded_family: Family,
                                                          tmp_path: Path) -> None:
    commits = _push(hub, sharded_family)
    file = "model-00001-of-00003.safetensors"
    dest = tmp_path / "downloads" / file
    partial_path(dest).mkdir(parents=True)  # as a full disk would, the write fails
    with pytest.raises(OutputError, match=f"^{partial_path(dest)}: cannot write a download"):
        fetch_file(HubSnapshot("acme/base", commits["acme/base"], tmp_path), file, dest, 50_448)


def test_a_file_gone_at_download_time_is_one_line(hub: HubServer, sharded_family: Family,
                                                  tmp_path: Path) -> None:
    """With a download folder and no budget: shards fed the same way, without a limit."""
    commits = _push(hub, sharded_family)
    file = "model-00002-of-00003.safetensors"
    served = hub.commits["acme/ft1"][commits["acme/ft1"]]
    hub.on(_download_of("acme/ft1", file), lambda: served.pop(file))
    downloads = tmp_path / "downloads"
    with pytest.raises(StreamMergeError) as e:
        streammerge.merge(_budgeted(*REPOS, download_dir=str(downloads)), tmp_path / "out",
                          quiet=True)
    missing = f"file '{file}' not found in acme/ft1 at {commits['acme/ft1']}"
    assert missing in str(e.value), str(e.value)
    assert "\n" not in str(e.value)
    assert (downloads / "acme--base" / commits["acme/base"] / file).is_file()  # kept, to resume
    assert not list((tmp_path / "hf_home").rglob("*.safetensors"))


def test_a_killed_budgeted_merge_resumes_without_fetching_finished_shards_again(
        hub: HubServer, sharded_family: Family, tmp_path: Path) -> None:
    _push(hub, sharded_family)
    plan = _budgeted(*REPOS, disk_budget="10MB")
    sched = streammerge.schedule(plan)
    try:
        order = run_order(sched)
        first = sched.checkpoints[0].shard_of(order[0].inputs[0].tensor).path.name
        reads = [{sched.checkpoints[s.checkpoint].shard_of(s.tensor).path.name for s in j.inputs}
                 for j in order]
    finally:
        sched.close()
    finished = next(k for k, names in enumerate(reads) if names != {first})  # read shard 1 only
    assert 1 < finished and all(first not in names for names in reads[finished:])
    path, out = tmp_path / "plan.yaml", tmp_path / "hub"
    path.write_text(yaml.safe_dump(plan))
    hub.bytes_per_second = 200_000  # about 2 s of downloads: shards are still to fetch at the kill
    child = subprocess.run([sys.executable, str(CHILD), str(path), str(out), "record",
                            str(finished)], capture_output=True, text=True, timeout=300)
    assert child.returncode == -9, child.stderr
    killed = len(hub.log)
    staging = tmp_path / ".hub.streammerge-partial" / "downloads"
    kept = {(p.parent.parent.name, p.name) for p in staging.rglob("*.safetensors")}
    streammerge.merge(path, out, quiet=True)
    assert _shards(out) == _local(sharded_family, tmp_path / "local")
    again = {(r.repo.replace("/", "--"), r.file) for r in _downloads(hub, killed)}
    assert again and first not in {file for _, file in again}  # shard 1's tensors all finished
    assert not kept & again  # complete downloads the killed run left are read, not fetched


def test_shards_that_schedule_order_keeps_alive_are_merged_by_shard(hub: HubServer,
                                                                    tmp_path: Path) -> None:
    """Layers 0 and 2 in the first shard, layer 1 in the second: by layer, the first shard would
    live through the second; ordered by shard, one shard per model is on disk at a time."""
    tensors = base_tensors(Arch(), 0)
    rank = {0: 0, 2: 1, 1: 2}  # written in this layer order, 15 tensors to a shard
    names = sorted(tensors, key=lambda n: -1 if n == "model.embed_tokens.weight" else
                   rank[int(n.split(".")[2])] if n.startswith("model.layers.") else 3)
    models = [write_checkpoint(tmp_path / f"m{k}", {n: tensors[n] + 0.01 * k for n in names},
                               Arch().config(torch.float32), shards=2) for k in range(3)]
    for repo, model in zip(REPOS, models):
        hub.push(repo, model)
    plan = _budgeted(*REPOS)
    sched = streammerge.schedule(plan)
    try:
        assert live_peak(sched, run_order(sched)) < live_peak(sched, list(sched.jobs))
        budget = live_peak(sched, run_order(sched)) + sched.write_bytes
    finally:
        sched.close()
    out = tmp_path / "hub"
    streammerge.merge({**plan, "disk_budget": budget}, out, quiet=True)
    streammerge.merge(_budgeted(*map(str, models)), tmp_path / "local", quiet=True)
    assert _shards(out) == _shards(tmp_path / "local")



def test_downloads_on_another_filesystem_count_alone(hub: HubServer, sharded_family: Family,
                                                     tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on a filesystem other than the test's temporary folder")
    _push(hub, sharded_family)
    budget, output = _smallest_budget(_budgeted(*REPOS))
    with pytest.raises(PlanError, match="or a --download-dir on another filesystem"):
        streammerge.schedule(_budgeted(*REPOS, disk_budget=budget - output))
    with tempfile.TemporaryDirectory(dir=shm) as downloads:
        plan = _budgeted(*REPOS, disk_budget=budget - output, download_dir=downloads)
        streammerge.merge(plan, tmp_path / "hub", quiet=True)
        assert not list(Path(downloads).iterdir())
    assert _shards(tmp_path / "hub") == _local(sharded_family, tmp_path / "local")


def test_shards_complete_in_the_cache_are_read_in_place_and_count_nothing(
        hub: HubServer, sharded_family: Family, tmp_path: Path) -> None:
    _push(hub, sharded_family)
    streammerge.merge(_budgeted(*REPOS), tmp_path / "first", quiet=True)  # into the cache
    budget, output = _smallest_budget(_budgeted(*REPOS))
    assert budget == output
    before = len(hub.log)
    streammerge.merge(_budgeted(*REPOS, disk_budget=output), tmp_path / "hub", quiet=True)
    assert not _downloads(hub, before)
    assert _shards(tmp_path / "hub") == _shards(tmp_path / "first")


def test_an_adapter_output_refuses_the_download_keys(fp32_family: Family) -> None:
    from streammerge.plan import MergePlan

    plan = {**_plan(str(fp32_family.base), *map(str, fp32_family.models[:2])),
            "adapter_output": {"combination": "cat"}}
    for key, value in (("disk_budget", "1GB"), ("download_dir", "/tmp/d")):
        with pytest.raises(ValueError, match="adapter_output reads only adapters: drop them"):
            MergePlan.model_validate({**plan, key: value})
