"""The test Hub (tests/hub_server.py) against huggingface_hub's own client, over 127.0.0.1."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from checkpoint_builder import Family
from hub_server import HubServer, hub  # noqa: F401  (the fixture)

SHARD = "model-00001-of-00003.safetensors"


def test_downloads_snapshot_and_model_info(hub: HubServer, sharded_family: Family) -> None:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    commit = hub.push("acme/tiny", sharded_family.base)
    info = HfApi().model_info("acme/tiny")
    assert info.sha == commit and SHARD in {s.rfilename for s in info.siblings}
    assert HfApi().model_info("acme/tiny", revision=commit).sha == commit
    path = Path(hf_hub_download("acme/tiny", SHARD))
    assert path.read_bytes() == (sharded_family.base / SHARD).read_bytes()
    assert path.parent.name == commit  # the cache's snapshots/<commit>
    root = Path(snapshot_download("acme/tiny", allow_patterns=["*.json"]))
    json_files = sorted(p.name for p in sharded_family.base.glob("*.json"))
    assert sorted(p.name for p in root.glob("*.json")) == json_files
    assert [r.status for r in hub.requests("HEAD")] and {r.status for r in hub.log} == {200}


def test_range_get_answers_206_with_content_range(hub: HubServer, sharded_family: Family) -> None:
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session

    commit = hub.push("acme/tiny", sharded_family.base)
    data = (sharded_family.base / SHARD).read_bytes()
    r = get_session().get(hf_hub_url("acme/tiny", SHARD, revision=commit),
                          headers={**build_hf_headers(), "Range": "bytes=8-23"})
    assert r.status_code == 206 and r.content == data[8:24]
    assert r.headers["Content-Range"] == f"bytes 8-23/{len(data)}" and r.headers["X-Repo-Commit"] == commit
    assert hub.log[-1].range == "bytes=8-23" and hub.log[-1].sent == 16 and hub.log[-1].status == 206


def test_missing_repo_revision_and_file_raise_hf_errors(hub: HubServer, sharded_family: Family) -> None:
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    hub.push("acme/tiny", sharded_family.base)
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info("acme/missing")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("acme/tiny", "config.json", revision="v9")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("acme/tiny", "nothing.json")


def test_a_second_push_moves_main_and_keeps_the_first_commit(hub: HubServer, sharded_family: Family) -> None:
    from huggingface_hub import HfApi, hf_hub_download

    first = hub.push("acme/tiny", sharded_family.models[0])
    second = hub.push("acme/tiny", sharded_family.models[1])
    assert HfApi().model_info("acme/tiny").sha == second != first
    old = Path(hf_hub_download("acme/tiny", SHARD, revision=first))
    assert old.read_bytes() == (sharded_family.models[0] / SHARD).read_bytes()


def test_faults_throttle_and_hooks(hub: HubServer, sharded_family: Family) -> None:
    from huggingface_hub import hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import get_session, hf_raise_for_status

    commit = hub.push("acme/tiny", sharded_family.base)
    url = hf_hub_url("acme/tiny", SHARD, revision=commit)
    size = (sharded_family.base / SHARD).stat().st_size
    hub.fail(SHARD, times=2)
    for _ in range(2):
        with pytest.raises(HfHubHTTPError):
            hf_raise_for_status(get_session().get(url))
    assert get_session().get(url).status_code == 200
    hub.drop(SHARD, after=100)
    with pytest.raises(Exception):  # a body shorter than its Content-Length
        get_session().get(url)
    assert hub.log[-1].sent == 100
    seen: list[str] = []
    hub.on(lambda r: r.method == "GET" and r.range is not None, lambda: seen.append("hook"))
    hub.bytes_per_second = size / 0.3
    began = time.monotonic()
    assert len(get_session().get(url, headers={"Range": "bytes=0-"}).content) == size
    assert time.monotonic() - began >= 0.25 and seen == ["hook"]
