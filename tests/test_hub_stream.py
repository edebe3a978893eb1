"""Hub models planned from their headers, then merged at the commit planning resolved, against the
test Hub (tests/hub_server.py) on 127.0.0.1."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import streammerge
from checkpoint_builder import Arch, Family, write_family
from hub_server import HubServer, Request, hub  # noqa: F401  (the fixture)
from streammerge.errors import StreamMergeError

REPOS = ("acme/base", "acme/ft1", "acme/ft2")
SMALL = re.compile(r"\.json$")


def _plan(base: str, a: str, b: str, **params: object) -> dict:
    return {"merge_method": "ties", "base_model": base, "parameters": {"density": 0.5, **params},
            "models": [{"model": a, "parameters": {"weight": 0.7}},
                       {"model": b, "parameters": {"weight": 0.5}}]}


def _push(hub: HubServer, family: Family) -> dict[str, str]:
    """The family's base and first two fine-tunes as REPOS; their commits."""
    return {repo: hub.push(repo, d) for repo, d in zip(REPOS, (family.base, *family.models[:2]))}


def _local_merge(family: Family, out: Path) -> Path:
    """The same merge of the local copies of what ``_push`` serves."""
    return streammerge.merge(_plan(str(family.base), *map(str, family.models[:2])), out, quiet=True).output


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


def _header_lengths(model: Path) -> dict[str, int]:
    """Each shard's header length (its first 8 bytes)."""
    return {p.name: int.from_bytes(p.read_bytes()[:8], "little") for p in model.glob("*.safetensors")}


def _only_headers_read(log: list[Request], sizes: dict[str, int]) -> None:
    """Every shard request was a range of its 8-byte length or of its header; the rest small files."""
    for r in log:
        if r.file is None or SMALL.search(r.file):
            continue
        assert r.method == "GET" and r.range is not None, r
        start, stop = (int(x) for x in r.range.removeprefix("bytes=").split("-"))
        assert (start, stop) in ((0, 7), (8, 7 + sizes[r.file])), r
        assert r.sent == stop - start + 1


def test_hub_merge_matches_local_and_downloads_after_planning(hub: HubServer, sharded_family: Family,
                                                               tmp_path: Path) -> None:
    commits = _push(hub, sharded_family)
    local = _local_merge(sharded_family, tmp_path / "local")
    sched = streammerge.schedule(_plan(*REPOS))
    try:
        _only_headers_read(hub.requests(), _header_lengths(sharded_family.base))
    finally:
        sched.close()
    planned = len(hub.log)
    streammerge.merge(_plan(*REPOS), tmp_path / "hub", quiet=True)
    assert _shards(tmp_path / "hub") == _shards(local)
    run = [r for r in hub.log[planned:] if r.method == "GET" and str(r.file).endswith(".safetensors")]
    assert all(r.revision == commits[r.repo] for r in run)
    downloads = [i for i, r in enumerate(run) if r.range is None]  # after every header read
    assert len(downloads) == 9 and downloads == list(range(len(run) - 9, len(run)))
    record = yaml.safe_load((tmp_path / "hub" / "streammerge_plan.yaml").read_text())
    revisions = {ref: v["revision"] for ref, v in record["inputs"].items()}
    assert revisions == {f"{r}@{c}": c for r, c in commits.items()}


def test_plan_errors_come_before_any_weight_byte(hub: HubServer, sharded_family: Family,
                                                 tmp_path_factory: pytest.TempPathFactory) -> None:
    wide = write_family(tmp_path_factory.mktemp("wide"), Arch(hidden=48), n=1, shards=3)
    _push(hub, sharded_family)
    hub.push("acme/wide", wide.models[0])
    with pytest.raises(StreamMergeError) as shapes:
        streammerge.schedule(_plan("acme/base", "acme/ft1", "acme/wide"))
    assert "shape" in str(shapes.value) and "\n" not in str(shapes.value)
    with pytest.raises(StreamMergeError) as param:
        streammerge.schedule(_plan(*REPOS, density=1.5))
    assert "density" in str(param.value) and "\n" not in str(param.value)
    sizes, wide_sizes = _header_lengths(sharded_family.base), _header_lengths(wide.models[0])
    for r in hub.log:  # acme/wide's headers are longer: each is checked against its own file
        _only_headers_read([r], wide_sizes if r.path.startswith("/acme/wide/") else sizes)
    assert any(r.range == "bytes=0-7" for r in hub.log)


def test_the_revision_resolves_once(hub: HubServer, sharded_family: Family, tmp_path: Path) -> None:
    commits = _push(hub, sharded_family)
    pushed: list[str] = []
    # a new commit on acme/ft1's main while the plan reads headers, after the revision resolved
    hub.on(lambda r: r.range == "bytes=0-7" and r.path.startswith("/acme/ft1/"),
           lambda: pushed.append(hub.push("acme/ft1", sharded_family.models[2])))
    streammerge.merge(_plan(*REPOS), tmp_path / "hub", quiet=True)
    local = _local_merge(sharded_family, tmp_path / "local")
    assert pushed and _shards(tmp_path / "hub") == _shards(local)
    assert not [r for r in hub.log if pushed[0] in r.path]
    assert len([r for r in hub.log if r.path == "/api/models/acme/ft1/revision/main"]) == 1
    assert commits["acme/ft1"] in (tmp_path / "hub" / "README.md").read_text()


def test_missing_repo_revision_and_file_are_one_line(hub: HubServer, sharded_family: Family,
                                                      tmp_path: Path) -> None:
    _push(hub, sharded_family)
    broken = tmp_path / "broken"
    shutil.copytree(sharded_family.models[1], broken)
    (broken / "model-00002-of-00003.safetensors").unlink()
    commit = hub.push("acme/broken", broken)
    cases = {"acme/nothing": "repository acme/nothing not found",
             "acme/ft1@v9": "revision 'v9' of acme/ft1 not found",
             "acme/broken": f"file 'model-00002-of-00003.safetensors' not found in acme/broken at {commit}"}
    for ref, message in cases.items():
        with pytest.raises(StreamMergeError) as e:
            streammerge.schedule(_plan("acme/base", "acme/ft1", ref))
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_plan_command_prints_the_download_and_the_disk(hub: HubServer, sharded_family: Family,
                                                        tmp_path: Path) -> None:
    _push(hub, sharded_family)
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump(_plan(*REPOS)))
    proc = subprocess.run([sys.executable, "-m", "streammerge", "plan", str(plan)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    files = [p for d in (sharded_family.base, *sharded_family.models[:2]) for p in d.glob("*.safetensors")]
    size = sum(p.stat().st_size for p in files)
    assert f"({size:,} bytes: 9 shards of 3 Hub models, at the commits planned)" in proc.stdout
    disk = re.search(r"disk .* \(([\d,]+) bytes: downloads \+ output\)", proc.stdout)
    written = int(disk.group(1).replace(",", ""))
    out = _local_merge(sharded_family, tmp_path / "local")
    assert written == size + sum(p.stat().st_size for p in out.glob("*.safetensors"))
    _only_headers_read(hub.requests(), _header_lengths(sharded_family.base))


def test_a_complete_cache_is_read_in_place(hub: HubServer, sharded_family: Family,
                                            tmp_path: Path) -> None:
    _push(hub, sharded_family)
    streammerge.merge(_plan(*REPOS), tmp_path / "first", quiet=True)
    before = len(hub.log)
    sched = streammerge.schedule(_plan(*REPOS))
    try:
        from streammerge.sources.downloads import hub_downloads

        assert hub_downloads(sched) == []
    finally:
        sched.close()
    assert not [r for r in hub.log[before:] if r.range is not None]


def test_an_unsharded_model_and_a_read_before_any_download(hub: HubServer, fp32_family: Family,
                                                           tmp_path: Path) -> None:
    from streammerge.io.reader import Checkpoint
    from streammerge.plan.load import resolve_model

    commits = _push(hub, fp32_family)
    assert streammerge.merge(_plan(*REPOS), tmp_path / "hub", quiet=True).tensors
    assert _shards(tmp_path / "hub") == _shards(_local_merge(fp32_family, tmp_path / "local"))
    ckpt = Checkpoint(resolve_model("acme/ft2@" + commits["acme/ft2"], cache_dir=str(tmp_path / "other")))
    try:  # a reader of a Hub model that no merge downloaded for: its first read downloads the file
        name = next(iter(ckpt.tensors))
        assert torch.equal(ckpt.read(name), fp32_family.tensors[fp32_family.models[1]][name])
    finally:
        ckpt.close()


def test_a_hub_shard_that_is_not_safetensors_is_refused_naming_it(hub: HubServer, fp32_family: Family,
                                                                   tmp_path: Path) -> None:
    stub = tmp_path / "stub"
    shutil.copytree(fp32_family.models[0], stub)
    (stub / "model.safetensors").write_bytes(b"abc")
    commit = hub.push("acme/stub", stub)
    refused = f"acme/stub@{commit}: model.safetensors: not a safetensors file"
    with pytest.raises(StreamMergeError, match=refused):
        streammerge.schedule(_plan("acme/stub", "acme/stub", "acme/stub"))


def test_planning_retries_a_failed_header_read(hub: HubServer, sharded_family: Family,
                                               tmp_path: Path) -> None:
    """Two 500s, then a connection dropped 4 bytes into the 8-byte length: planning still reads
    the header, the last retry asking only for the 4 bytes missing."""
    _push(hub, sharded_family)
    shard = sorted(p.name for p in sharded_family.base.glob("*.safetensors"))[0]
    hub.fail(shard, 2)
    hub.drop(shard, after=4)
    streammerge.schedule(_plan(*REPOS)).close()
    first = [(r.range, r.status, r.sent) for r in hub.log if r.file == shard][:4]
    assert first == [("bytes=0-7", 500, 0), ("bytes=0-7", 500, 0), ("bytes=0-7", 206, 4),
                     ("bytes=4-7", 206, 4)]
    assert _shards(streammerge.merge(_plan(*REPOS), tmp_path / "hub", quiet=True).output) == \
        _shards(_local_merge(sharded_family, tmp_path / "local"))
