"""The command line: run, plan, overrides, and one-line errors that leave nothing behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from checkpoint_builder import Family, write_checkpoint
from conftest import load_output
from streammerge.cli import main


def _plan(family: Family, **extra) -> dict:
    return {"merge_method": "ties", "base_model": str(family.base), "dtype": "float32",
            "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}} for m in family.models]} | extra


def _write(tmp_path: Path, plan: dict) -> Path:
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def _invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_run_with_positional_output_and_plan_output(fp32_family: Family, tmp_path: Path) -> None:
    result = _invoke("run", _write(tmp_path, _plan(fp32_family)), tmp_path / "a", "-q")
    assert result.exit_code == 0, result.output
    plan_out = _write(tmp_path, _plan(fp32_family, output=str(tmp_path / "from_plan")))
    assert _invoke("run", plan_out, "-q").exit_code == 0
    assert _invoke("run", plan_out, "-o", tmp_path / "override", "-q").exit_code == 0
    a, b = load_output(tmp_path / "a"), load_output(tmp_path / "override")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "from_plan" / "model.safetensors").exists()


def test_run_prints_a_progress_bar_and_summary_unless_quiet(fp32_family: Family, tmp_path: Path) -> None:
    plan = _write(tmp_path, _plan(fp32_family))
    loud = _invoke("run", plan, tmp_path / "a")
    assert loud.exit_code == 0
    assert "merging" in loud.output and "100%" in loud.output and "wrote" in loud.output
    quiet = _invoke("run", plan, tmp_path / "b", "--quiet")
    assert quiet.exit_code == 0 and quiet.output == ""


def test_plan_prints_the_schedule_without_writing(fp32_family: Family, tmp_path: Path) -> None:
    result = _invoke("plan", _write(tmp_path, _plan(fp32_family)), "--shard-size", "30KB")
    assert result.exit_code == 0, result.output
    n = len(fp32_family.tensors[fp32_family.base])
    assert f"tensors       {n} ({n} merged" in result.output
    assert "model-00001-of-" in result.output and "peak memory" in result.output and "predicted" in result.output
    read = sum(t.numel() * 4 for p in [fp32_family.base, *fp32_family.models] for t in fp32_family.tensors[p].values())
    assert f"read          {read / 2**20:.1f} MiB" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.yaml"]


def test_overwrite_replaces_an_existing_output(fp32_family: Family, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    plan = _write(tmp_path, _plan(fp32_family))
    refused = _invoke("run", plan, out)
    assert refused.exit_code == 1 and "--overwrite" in refused.output
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert _invoke("run", plan, out, "--overwrite", "-q").exit_code == 0
    assert not (out / "old.txt").exists() and (out / "model.safetensors").exists()


def test_running_a_finished_merge_again_is_up_to_date(fp32_family: Family, tmp_path: Path) -> None:
    """A run killed after its output was committed (before it reported success) is complete: the same
    command again exits 0 and touches nothing; another plan into that output is still refused."""
    out = tmp_path / "out"
    plan = _write(tmp_path, _plan(fp32_family))
    assert _invoke("run", plan, out, "-q").exit_code == 0
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    again = _invoke("run", plan, out)
    assert again.exit_code == 0 and "already holds this merge's finished output" in again.output
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before
    other = _write(tmp_path, {**_plan(fp32_family), "seed": 9})
    refused = _invoke("run", other, out)
    assert refused.exit_code == 1 and "output already exists; pass --overwrite" in refused.output


def _mismatched(tmp_path: Path, family: Family) -> dict:
    tensors = dict(family.tensors[family.models[0]])
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    bad = write_checkpoint(tmp_path / "bad", tensors, family.arch.config(torch.float32))
    plan = _plan(family)
    plan["models"][0]["model"] = str(bad)
    return plan


BAD_PLANS = {
    "missing model directory": (lambda t, f: _plan(f) | {"base_model": str(t / "nope")}, ["base_model", "nope", "not found"]),
    "mismatched shapes": (_mismatched, ["model.layers.1.mlp.up_proj.weight", "[3, 3]", "bad"]),
    "unknown method": (lambda t, f: _plan(f) | {"merge_method": "tiez"}, ["merge_method", "tiez", "ties"]),
    "unknown parameter": (lambda t, f: _plan(f) | {"parameters": {"densty": 0.5}}, ["parameters.densty", "valid", "density"]),
    "out-of-range parameter": (
        lambda t, f: _plan(f) | {"models": [{"model": str(f.models[0]), "parameters": {"weight": 1, "density": 1.5}}]},
        ["models[0].parameters.density", "1.5", "<= 1.0"]),
    "missing weight": (lambda t, f: _plan(f) | {"models": [{"model": str(f.models[0])}]}, ["weight", "ft1"]),
    "unknown key": (lambda t, f: _plan(f) | {"shard_sise": "1GB"}, ["shard_sise"]),
    "bad size": (lambda t, f: _plan(f) | {"shard_size": "lots"}, ["shard_size", "lots"]),
    "slerp with three models": (lambda t, f: {"merge_method": "slerp", "base_model": str(f.base), "parameters": {"t": 0.5},
                                              "models": [{"model": str(m)} for m in f.models]}, ["slerp", "exactly 2"]),
    "no base for ties": (lambda t, f: {k: v for k, v in _plan(f).items() if k != "base_model"}, ["base_model", "ties"]),
}


@pytest.mark.parametrize("case", list(BAD_PLANS))
def test_bad_input_is_one_line_and_writes_nothing(case: str, fp32_family: Family, tmp_path: Path) -> None:
    make, expected = BAD_PLANS[case]
    plan = _write(tmp_path, make(tmp_path, fp32_family))
    out = tmp_path / "out"
    result = _invoke("run", plan, out, "--strict")
    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for word in expected:
        assert word in lines[0], (word, lines[0])
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_errors_have_no_traceback_in_a_real_process(tmp_path: Path) -> None:
    plan = _write(tmp_path, {"merge_method": "linear", "models": [{"model": str(tmp_path / "missing"), "parameters": {"weight": 1}}]})
    proc = subprocess.run([sys.executable, "-m", "streammerge", "run", str(plan), str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"error: {plan}: models[0].model: model directory '{tmp_path / 'missing'}' not found "
                                                "(relative paths are tried from the current directory, then the plan's; "
                                                "'org/name[@revision]' is fetched from the Hugging Face Hub)"]
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_help_lists_the_commands_and_options() -> None:
    top = _invoke("--help").output
    assert "run" in top and "plan" in top and "methods" in top
    run = _invoke("run", "--help").output
    for option in ("--output", "--overwrite", "--quiet", "--shard-size", "--max-memory", "--chunk-size", "--compute-dtype", "--seed"):
        assert option in run
    assert "ties" in _invoke("methods").output


def test_relative_model_paths_resolve_from_the_plan_directory(fp32_family: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = fp32_family.base.parent
    plan = {"merge_method": "linear", "models": [{"model": "ft1", "parameters": {"weight": 1}}, {"model": "ft2", "parameters": {"weight": 1}}]}
    (root / "rel.yaml").write_text(yaml.safe_dump(plan))
    monkeypatch.chdir(tmp_path)
    result = _invoke("run", root / "rel.yaml", "out", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float32"


def test_mergekit_configs_warn_once_per_meaningless_key(fp32_family: Family, tmp_path: Path) -> None:
    """Keys mergekit ignores (a model's name, a stray top-level key, a parameter the method lacks)
    are one warning line each and the merge runs; --strict makes the first one an error."""
    plan = _plan(fp32_family) | {"normalize": True, "parameters": {"densty": 0.5, "lambda": "0.5"}}
    plan["models"][0]["name"] = "math"
    path = _write(tmp_path, plan)
    result = CliRunner().invoke(main, ["run", str(path), str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 3
    assert any("normalize: unknown key" in w for w in warnings)
    assert any("models[0].name: unknown key" in w for w in warnings)
    assert any("parameters.densty: ties has no parameter 'densty'" in w for w in warnings)
    assert all(w.endswith("it has no effect") for w in warnings)
    strict = _invoke("run", path, tmp_path / "out2", "--strict")
    assert strict.exit_code == 1 and strict.output.startswith("error: ") and "unknown key" in strict.output


def test_native_plans_are_strict_by_default(fp32_family: Family, tmp_path: Path) -> None:
    path = _write(tmp_path, _plan(fp32_family, seed=3) | {"parameters": {"densty": 0.5}})
    result = _invoke("run", path, tmp_path / "out")
    assert result.exit_code == 1 and "parameters.densty" in result.output
    assert _invoke("run", path, tmp_path / "out", "--lenient", "-q").exit_code == 0


def test_numeric_strings_are_coerced_like_mergekit(fp32_family: Family, tmp_path: Path) -> None:
    """YAML reads 1e-1 without a dot as a string; mergekit coerces it, so do we."""
    text = yaml.safe_dump(_plan(fp32_family)).replace("density: 0.5", "density: 5e-1")
    (tmp_path / "a.yaml").write_text(text)
    assert yaml.safe_load(text)["models"][0]["parameters"]["density"] == "5e-1"
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(_plan(fp32_family)))
    assert _invoke("run", tmp_path / "a.yaml", tmp_path / "a", "-q").exit_code == 0
    assert _invoke("run", tmp_path / "b.yaml", tmp_path / "b", "-q").exit_code == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("extra,message", [
    ({"tokenizer": {"source": "union"}}, "no tokenizer.json, which tokenizer 'union' is built from"),
    ({"chat_template": "chat"}, "chat_template: got 'chat', expected 'auto', a built-in template"),
    ({"tokenizer_source": "base", "tokenizer": {"source": "base"}}, "give 'tokenizer_source' or a 'tokenizer:' block, not both"),
    ({"tokenizer": {"pad_to_multiple_of": 0}}, "tokenizer.pad_to_multiple_of"),
])
def test_tokenizer_plan_errors_are_one_line(extra: dict, message: str, fp32_family: Family, tmp_path: Path) -> None:
    result = _invoke("run", _write(tmp_path, _plan(fp32_family) | extra), tmp_path / "out")
    assert result.exit_code == 1 and message in result.output and not (tmp_path / "out").exists()
    assert "Traceback" not in result.output


def test_multi_document_files_run_stage_by_stage(fp32_family: Family, tmp_path: Path) -> None:
    """mergekit-multi: a named stage feeds a later document; a finished stage is not merged again."""
    f = fp32_family
    stage = {"name": "soup", "merge_method": "linear", "dtype": "float32",
             "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in f.models[:2]]}
    final = {"merge_method": "task_arithmetic", "base_model": str(f.base), "dtype": "float32",
             "models": [{"model": "soup", "parameters": {"weight": 0.5}}, {"model": str(f.models[2]), "parameters": {"weight": 0.5}}]}
    path = tmp_path / "multi.yaml"
    path.write_text(yaml.safe_dump(stage) + "---\n" + yaml.safe_dump(final))
    first = _invoke("run", path, tmp_path / "out", "-q")
    assert first.exit_code == 0, first.output
    soup = tmp_path / "out-stages" / "soup"
    out, mid = load_output(tmp_path / "out"), load_output(soup)
    t = f.tensors
    n = "model.layers.1.mlp.up_proj.weight"
    assert torch.allclose(mid[n].double(), (t[f.models[0]][n].double() + t[f.models[1]][n].double()) / 2, atol=1e-7)
    want = t[f.base][n].double() + 0.5 * (mid[n].double() - t[f.base][n].double()) + 0.5 * (t[f.models[2]][n].double() - t[f.base][n].double())
    assert (out[n].double() - want).abs().max() < 1e-6
    stamp, merged = (soup / "model.safetensors").stat().st_mtime_ns, (tmp_path / "out" / "model.safetensors").read_bytes()
    again = _invoke("run", path, tmp_path / "out", "--overwrite")  # e.g. after a crash in the last stage
    assert again.exit_code == 0 and "stage 'soup' is already merged" in again.output
    assert (soup / "model.safetensors").stat().st_mtime_ns == stamp
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == merged


def test_multi_document_stages_need_names(fp32_family: Family, tmp_path: Path) -> None:
    path = tmp_path / "multi.yaml"
    path.write_text(yaml.safe_dump(_plan(fp32_family)) + "---\n" + yaml.safe_dump(_plan(fp32_family)))
    result = _invoke("run", path, tmp_path / "out")
    assert result.exit_code == 1 and "(document 1): every document but the last needs a 'name:'" in result.output
