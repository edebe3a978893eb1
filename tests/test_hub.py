"""Models named org/name[@revision], resolved through huggingface_hub from a local cache (no network).

huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when imported, so each case runs the real CLI in a
child process with them set, as a user would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from checkpoint_builder import Family
from conftest import hub_cache, load_output


@pytest.fixture(scope="module")
def hf_home(sharded_family: Family, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hub_cache(tmp_path_factory.mktemp("hf"), "acme/tiny-ft", {"1" * 40: sharded_family.models[0], "2" * 40: sharded_family.models[1]},
                  {"main": "2" * 40, "v1": "1" * 40})


def _run(family: Family, ref: str, out: Path, home: Path, *args: str) -> subprocess.CompletedProcess:
    plan = out.parent / f"{out.name}.yaml"
    plan.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(family.models[2]), "parameters": {"weight": 1.0}}, {"model": ref, "parameters": {"weight": 1.0}}]}))
    env = os.environ | {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "streammerge", "run", str(plan), str(out), "-q", *args],
                          capture_output=True, text=True, env=env)


def test_hub_names_and_revisions_resolve_from_the_cache(hf_home: Path, sharded_family: Family, tmp_path: Path) -> None:
    import streammerge

    for ref, local in (("acme/tiny-ft", sharded_family.models[1]), ("acme/tiny-ft@v1", sharded_family.models[0])):
        out = tmp_path / ref.replace("/", "_").replace("@", "_")
        proc = _run(sharded_family, ref, out, hf_home)
        assert proc.returncode == 0, proc.stderr
        plan = {"merge_method": "linear", "models": [{"model": str(sharded_family.models[2]), "parameters": {"weight": 1.0}},
                                                     {"model": str(local), "parameters": {"weight": 1.0}}]}
        streammerge.merge(plan, out.with_name(out.name + "_local"), quiet=True)
        a, b = load_output(out), load_output(out.with_name(out.name + "_local"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert "1" * 40 in (out / "README.md").read_text() if ref.endswith("@v1") else "2" * 40 in (out / "README.md").read_text()


def test_cache_dir_option_and_unknown_repos(hf_home: Path, sharded_family: Family, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    missing = _run(sharded_family, "acme/tiny-ft", tmp_path / "o1", empty)
    assert missing.returncode == 1 and not (tmp_path / "o1").exists()
    assert missing.stderr.strip().splitlines() == [missing.stderr.strip()]
    assert missing.stderr.startswith("error: acme/tiny-ft: cannot fetch from the Hugging Face Hub")
    found = _run(sharded_family, "acme/tiny-ft", tmp_path / "o2", empty, "--cache-dir", str(hf_home / "hub"))
    assert found.returncode == 0, found.stderr
    unknown = _run(sharded_family, "acme/missing@v9", tmp_path / "o3", hf_home)
    assert unknown.returncode == 1 and unknown.stderr.startswith("error: acme/missing@v9: cannot fetch")
