"""The record in every output (``streammerge_plan.yaml``, ``merge_config.json``): running the
recorded plan reproduces the output byte for byte (shards, index, config and tokenizer files), it
names each input with its revision and header fingerprint, and a changed input is refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import method_cases
import streammerge
from checkpoint_builder import Family
from conftest import hub_cache
from family_builder import layout, write_standin
from streammerge.cli import main
from streammerge.io.reader import Checkpoint
from streammerge.methods import get_method

REPRODUCED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "model.safetensors.index.json", "streammerge_plan.yaml")


def _same_bytes(one: Path, two: Path) -> list[str]:
    """The files of ``one`` that must be byte-identical in ``two``, after checking they are."""
    names = sorted(p.name for p in one.glob("*.safetensors")) + [n for n in REPRODUCED if (one / n).exists()]
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    return names


def _run(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(main, [*map(str, args), "-q"])
    return result.exit_code, result.output


def test_the_linear_command_s_record_reproduces_it(tmp_path: Path) -> None:
    shapes, config = layout("phi3", 3)
    a, b = (write_standin(tmp_path / n, "phi3", t, config, torch.float32)
            for n, t in (("a", _random(shapes, 1)), ("b", _random(shapes, 2))))
    out, again = tmp_path / "out", tmp_path / "again"
    started = datetime.now(timezone.utc).replace(microsecond=0)
    code, output = _run("linear", "--model-a", a, "--model-b", b, "--alpha", 0.6, "--output-dir", out)
    assert code == 0, output
    assert _run("run", out / "streammerge_plan.yaml", again) == (0, "")
    names = _same_bytes(out, again)
    assert names == ["model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                     "tokenizer_config.json", "streammerge_plan.yaml"]
    record = yaml.safe_load((out / "streammerge_plan.yaml").read_text())
    assert "output" not in record
    assert record["models"] == [{"model": str(a), "parameters": {"weight": 0.6}},
                                {"model": str(b), "parameters": {"weight": 1 - 0.6}}]
    assert record["parameters"] == {"normalize": False}
    assert record["select"]["keep_tokens_from_base"] == "special"
    for model in (a, b):
        ckpt = Checkpoint(model)
        files = {name: [size, sha] for name, (size, sha) in ckpt.fingerprint().items()}
        ckpt.close()
        assert record["inputs"][str(model)] == {"revision": None, "files": files}
    meta = json.loads((out / "merge_config.json").read_text())
    assert meta["streammerge_version"] == streammerge.__version__ and meta["inputs"] == record["inputs"]
    assert meta["plan"] == "streammerge_plan.yaml" and meta["merge_method"] == "linear"
    created = datetime.fromisoformat(meta["created"])
    assert started <= created <= datetime.now(timezone.utc) + timedelta(seconds=1)


def _random(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: 0.02 * torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}


def test_a_sharded_chunked_plan_s_record_holds_every_parameter_and_reproduces(sharded_family: Family,
                                                                           tmp_path: Path) -> None:
    plan = {"merge_method": "ties", "base_model": str(sharded_family.base), "dtype": "float32",
            "shard_size": 20_000, "chunk_size": 7 * 32, "parameters": {"lambda": 0.9},
            "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": [0.3, 0.7]}}
                       for m in sharded_family.models]}
    out, again = tmp_path / "out", tmp_path / "again"
    streammerge.merge(plan, out, quiet=True)
    streammerge.merge(out / "streammerge_plan.yaml", again, quiet=True)
    names = _same_bytes(out, again)
    assert len([n for n in names if n.endswith(".safetensors")]) > 2
    assert "model.safetensors.index.json" in names
    record = yaml.safe_load((out / "streammerge_plan.yaml").read_text())
    defaults = {p.name: p.default for p in get_method("ties").params if p.default is not None}
    assert record["parameters"] == defaults | {"lambda": 0.9} and len(defaults) > 1
    assert record["models"][0]["parameters"] == {"weight": 0.5, "density": [0.3, 0.7]}
    assert (record["shard_size"], record["chunk_size"], record["dtype"]) == (20_000, 7 * 32, "float32")
    assert sorted(record["inputs"]) == sorted(str(p) for p in [sharded_family.base, *sharded_family.models])
    assert all(len(r["files"]) == 3 for r in record["inputs"].values())  # every shard of every input


def test_a_changed_input_is_refused(fp32_family: Family, tmp_path: Path) -> None:
    model = shutil.copytree(fp32_family.models[0], tmp_path / "ft")
    plan = {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 1.0}}
                                                 for m in (model, fp32_family.models[1])]}
    streammerge.merge(plan, tmp_path / "out", quiet=True)
    record = yaml.safe_load((tmp_path / "out" / "streammerge_plan.yaml").read_text())
    size, sha = record["inputs"][str(model)]["files"]["model.safetensors"]
    weights = model / "model.safetensors"
    save_file(load_file(str(weights)), str(weights), metadata={"format": "pt", "edited": "yes"})
    ckpt = Checkpoint(model)
    (now_size, now_sha), = ckpt.fingerprint().values()
    ckpt.close()
    code, output = _run("run", tmp_path / "out" / "streammerge_plan.yaml", tmp_path / "again")
    assert code == 1 and not (tmp_path / "again").exists()
    assert output == (f"error: inputs: {model}: model.safetensors is {now_size} bytes with header "
                      f"sha256 {now_sha[:16]}..., the record says {size} bytes with header sha256 "
                      f"{sha[:16]}...: the input changed, so the merge would not reproduce; restore it, "
                      "or drop its entry from 'inputs' to merge it as it is\n")


def test_a_hub_model_is_recorded_at_its_commit(sharded_family: Family, tmp_path: Path) -> None:
    commit = "1" * 40
    home = hub_cache(tmp_path / "hf", "acme/tiny-ft", {commit: sharded_family.models[0]}, {"v1": commit})
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(sharded_family.models[2]), "parameters": {"weight": 1.0}},
        {"model": "acme/tiny-ft@v1", "parameters": {"weight": 1.0}}]}))
    env = os.environ | {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    out, again = tmp_path / "out", tmp_path / "again"
    for source, target in ((plan, out), (out / "streammerge_plan.yaml", again)):
        proc = subprocess.run([sys.executable, "-m", "streammerge", "run", str(source), str(target), "-q"],
                              capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr
    record = yaml.safe_load((out / "streammerge_plan.yaml").read_text())
    assert record["models"][1]["model"] == f"acme/tiny-ft@{commit}"
    assert record["inputs"][f"acme/tiny-ft@{commit}"]["revision"] == commit
    assert record["inputs"][str(sharded_family.models[2])]["revision"] is None
    _same_bytes(out, again)


@pytest.mark.parametrize(("name", "extra"), method_cases.plan_cases())
def test_every_method_s_record_reproduces_it_with_its_defaults_written(name: str, extra: dict,
                                                                       fp32_family: Family,
                                                                       tmp_path: Path) -> None:
    """Plans that leave method-wide parameters at their defaults: the record writes them, and the
    rerun gives the same shards."""
    plan = method_cases.plan(name, extra, fp32_family.base, fp32_family.models, "float32")
    defaults = {p.name: p.default for p in get_method(name).params if p.default is not None}
    plan["parameters"] = {k: v for k, v in plan["parameters"].items() if k in extra or v != defaults.get(k)}
    streammerge.merge(plan, tmp_path / "out", quiet=True, chunk_size=7 * 32)
    streammerge.merge(tmp_path / "out" / "streammerge_plan.yaml", tmp_path / "again", quiet=True)
    _same_bytes(tmp_path / "out", tmp_path / "again")
    record = yaml.safe_load((tmp_path / "out" / "streammerge_plan.yaml").read_text())
    assert record["parameters"] == defaults | plan["parameters"] and record["chunk_size"] == 7 * 32
