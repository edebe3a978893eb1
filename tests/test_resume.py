"""Crash safety: a merge SIGKILLed at any point resumes to the bytes of an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

import streammerge
from checkpoint_builder import Family, write_checkpoint
from streammerge.cli import main
from streammerge.errors import CheckpointError, OutputError
from streammerge.journal import JOURNAL

CHILD = Path(__file__).with_name("crash_child.py")


def _plan(family: Family, **extra) -> dict:
    return {"merge_method": "ties", "base_model": str(family.base), "dtype": "float32",
            "shard_size": 20_000, "chunk_size": 7 * 32,  # several shards, several chunks per tensor
            "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}} for m in family.models]} | extra


def _files(out: Path) -> dict[str, bytes]:
    """Every output file but merge_config.json, which holds the time of the run."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "merge_config.json"}


def _staging(out: Path) -> Path:
    return out.parent / f".{out.name}.streammerge-partial"


def _journaled(out: Path) -> int:
    """Tensors the journal of ``out``'s staging directory records (complete lines after the first)."""
    return (_staging(out) / JOURNAL).read_text().count("\n") - 1


def _invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def _kill_points(plan: dict) -> dict[str, tuple[str, int]]:
    """(point, n) for crash_child.py: where each named moment of the merge falls for this plan."""
    sched = streammerge.schedule(plan)
    try:
        first = [j for j in sched.jobs if j.shard == 0]
        writes, mid = 0, None
        for k, job in enumerate(sched.jobs):  # the first multi-chunk tensor that is not its shard's first
            if mid is None and k and sched.jobs[k - 1].shard == job.shard and job.rows > job.rows_per_chunk:
                mid = writes + 1
            writes += -(-job.rows // job.rows_per_chunk)
        assert len(sched.shards) > 2 and len(first) > 1 and mid is not None
        return {
            "early": ("write", 1),  # before any tensor is finished
            "mid-shard": ("write", mid),  # a shard with a tensor finished and the next one half written
            "between shards": ("record", len(first)),  # the first shard complete, the second untouched
            "finalize, config written": ("finalize", 2),  # index and config.json written
            "finalize, before the rename": ("finalize", 6),  # every file written, not yet renamed
        }
    finally:
        sched.close()


@pytest.mark.parametrize("moment", ["early", "mid-shard", "between shards", "finalize, config written", "finalize, before the rename"])
def test_a_killed_merge_resumes_to_the_same_bytes(moment: str, fp32_family: Family, tmp_path: Path) -> None:
    plan = _plan(fp32_family)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    out = tmp_path / "out"
    streammerge.merge(path, out, quiet=True)
    reference = _files(out)
    shutil.rmtree(out)

    point, n = _kill_points(plan)[moment]
    child = subprocess.run([sys.executable, str(CHILD), str(path), str(out), point, str(n)], capture_output=True, text=True)
    assert child.returncode == -9, child.stderr
    assert not out.exists() and (_staging(out) / JOURNAL).exists()  # never a half-written model at OUT
    journaled = _journaled(out)

    result = _invoke("run", path, out)
    assert result.exit_code == 0, result.output
    if journaled:
        assert f"resumed: {journaled} of" in result.output
    assert _files(out) == reference
    assert not _staging(out).exists()
    assert _invoke("verify", out).exit_code == 0


def _with_nan(family: Family, root: Path, tensor: str) -> Path:
    tensors = dict(family.tensors[family.models[0]])
    tensors[tensor] = tensors[tensor].clone()
    tensors[tensor].view(-1)[5] = float("nan")
    return write_checkpoint(root / "nan_ft", tensors, family.arch.config(torch.float32))


def test_a_failed_merge_keeps_its_progress_and_resumes_only_the_same_merge(fp32_family: Family, tmp_path: Path) -> None:
    """A NaN in the last tensor stops the merge with the partial output kept; a changed plan
    refuses to resume into it; --allow-nonfinite (and a new chunk size) resumes it."""
    plan = _plan(fp32_family)
    sched = streammerge.schedule(plan)
    last = sched.jobs[-1].name
    sched.close()
    plan["models"][0]["model"] = str(_with_nan(fp32_family, tmp_path, last))
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as failed:
        streammerge.merge(plan, out, quiet=True)
    assert f"nan_ft/model.safetensors: tensor {last!r} holds NaN or Inf" in str(failed.value) and "--allow-nonfinite" in str(failed.value)
    assert f"the partial output is kept in {_staging(out)}" in str(failed.value)
    assert not out.exists()
    journaled = _journaled(out)
    assert journaled == len(fp32_family.tensors[fp32_family.base]) - 1  # every tensor but the last

    changed = plan | {"parameters": {"lambda": 0.9}}
    with pytest.raises(OutputError, match="cannot be resumed \\(the plan changed since it was started\\); run with --restart"):
        streammerge.merge(changed, out, quiet=True)

    result = streammerge.merge(plan, out, allow_nonfinite=True, chunk_size=10**9, quiet=True)  # run-only keys may change
    assert f"resumed: {journaled} of {journaled + 1} tensors were already written" in result.notes
    assert _invoke("verify", out).exit_code == 0 and not _staging(out).exists()


def test_a_changed_input_refuses_to_resume_and_restart_discards(fp32_family: Family, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(fp32_family.models[0], models / "ft1")
    plan = _plan(fp32_family)
    plan["models"][0]["model"] = str(models / "ft1")
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    out = tmp_path / "out"
    child = subprocess.run([sys.executable, str(CHILD), str(path), str(out), "record", "5"], capture_output=True, text=True)
    assert child.returncode == -9, child.stderr

    tensors = dict(fp32_family.tensors[fp32_family.models[0]])
    write_checkpoint(models / "ft1", tensors | {"extra.bias": torch.zeros(3)}, fp32_family.arch.config(torch.float32))
    refused = _invoke("run", path, out)
    assert refused.exit_code == 1 and not out.exists()
    lines = refused.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {_staging(out)}: holds a partial merge that cannot be resumed")
    assert f"input {models / 'ft1'}/model.safetensors changed" in lines[0] and "--restart" in lines[0]

    restarted = _invoke("run", path, out, "--restart")
    assert restarted.exit_code == 0, restarted.output
    assert "resumed" not in restarted.output and not _staging(out).exists()
    assert json.loads((out / "streammerge-manifest.json").read_text())["shards"]


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 2 MiB tmpfs: a disk that really fills up (needs root, as in this project's containers)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_a_full_disk_stops_with_a_message_and_resumes_once_space_is_freed(fp32_family: Family, small_disk: Path) -> None:
    plan = small_disk / "plan.yaml"
    plan.write_text(yaml.safe_dump(_plan(fp32_family)))
    out = small_disk / "out"
    streammerge.merge(plan, out, quiet=True)
    reference = _files(out)
    shutil.rmtree(out)

    page = os.statvfs(small_disk).f_frsize
    sched = streammerge.schedule(plan)
    needed = sum(-(-s.size // page) * page for s in sched.shards)
    tensors = len(sched.jobs)
    sched.close()
    free = os.statvfs(small_disk).f_bavail * page
    with open(small_disk / "filler", "wb") as f:  # leaves the shards and one page of journal room
        os.posix_fallocate(f.fileno(), 0, free - needed - page)

    full = _invoke("run", plan, out, "-q")
    assert full.exit_code == 1 and (full.exception is None or isinstance(full.exception, SystemExit))
    lines = full.output.strip().splitlines()
    assert len(lines) == 1 and "disk full while writing (No space left on device); free space and run again" in lines[0]
    assert f"the partial output is kept in {_staging(out)}" in lines[0] and not out.exists()
    journaled = _journaled(out)
    assert 0 < journaled < tensors

    (small_disk / "filler").unlink()
    resumed = _invoke("run", plan, out)
    assert resumed.exit_code == 0, resumed.output
    assert f"resumed: {journaled} of" in resumed.output
    assert _files(out) == reference
