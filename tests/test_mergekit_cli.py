"""mergekit-yaml's and mergekit-multi's command lines: streammerge-yaml, streammerge-multi, and
`streammerge run` taking every option of mergekit-yaml 0.1.5, each with its effect."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from checkpoint_builder import Family, write_checkpoint
from conftest import load_output
from streammerge.cli import main, multi_main, yaml_main
from streammerge.errors import PlanError
from streammerge.frontdoors import mergekit_cli

ROOT = Path(__file__).resolve().parent.parent
# mergekit-yaml 0.1.5's options, as its click command declares them (mergekit/options.py).
MERGEKIT_YAML_OPTIONS = (
    "--allow-crimes", "--no-allow-crimes", "--unsafe-truncate-embeddings", "--no-unsafe-truncate-embeddings",
    "--transformers-cache", "--lora-merge-cache", "--lora-merge-dtype", "--cuda", "--no-cuda", "--device",
    "--low-cpu-memory", "--no-low-cpu-memory", "--out-shard-size", "--copy-tokenizer", "--no-copy-tokenizer",
    "--clone-tensors", "--no-clone-tensors", "--trust-remote-code", "--no-trust-remote-code", "--random-seed",
    "--lazy-unpickle", "--no-lazy-unpickle", "--write-model-card", "--no-write-model-card",
    "--safe-serialization", "--no-safe-serialization", "-v", "--quiet", "--no-quiet", "--read-to-gpu",
    "--no-read-to-gpu", "--multi-gpu", "--no-multi-gpu", "--num-threads", "-j", "--gpu-rich", "--async-write",
    "--no-async-write", "--write-threads",
)


def _linear(family: Family, method: str = "linear", **extra) -> dict:
    plan = {"merge_method": method, "dtype": "float32",
            "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in family.models[:2]]}
    if method != "linear":
        plan["base_model"] = str(family.base)
        for m in plan["models"]:
            m["parameters"]["density"] = 0.5
    return plan | extra


def _write(tmp_path: Path, plan: dict, name: str = "config.yml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(plan))
    return path


def _yaml(*args) -> object:
    return CliRunner().invoke(yaml_main, [str(a) for a in args])


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.glob("*.safetensors"))}


@pytest.mark.parametrize("command", [yaml_main, main.commands["run"]], ids=["streammerge-yaml", "run"])
def test_every_mergekit_yaml_option_is_declared(command) -> None:
    declared = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
    assert set(MERGEKIT_YAML_OPTIONS) <= declared


def _translated(*args: str) -> mergekit_cli.Translation:
    """What streammerge-yaml makes of ``args``, parsed as its click command parses them."""
    params = yaml_main.make_context("streammerge-yaml", ["c.yml", "out", *args]).params
    given = {k: v for k, v in params.items() if k in mergekit_cli.NAMES or k == "device"}
    return mergekit_cli.translate(given, {})


@pytest.mark.parametrize("args, overrides, threads", [
    ([], {}, None),
    (["--allow-crimes"], {"allow_crimes": True}, None),
    (["--no-allow-crimes"], {"allow_crimes": False}, None),
    (["--unsafe-truncate-embeddings"], {"vocab_policy": "truncate"}, None),
    (["--no-unsafe-truncate-embeddings"], {}, None),
    (["--transformers-cache", "/tmp/hf"], {"cache_dir": "/tmp/hf"}, None),
    (["--cuda"], {"device": "cuda"}, None),
    (["--no-cuda"], {}, None),
    (["--gpu-rich"], {"device": "cuda"}, None),
    (["--device", "auto"], {"device": "auto"}, None),
    (["--device", "cuda:0"], {"device": "cuda"}, None),
    (["--device", "cpu", "--cuda"], {"device": "cpu"}, None),  # an explicit --device wins, as in mergekit
    (["--out-shard-size", "1B"], {"shard_size": 10**9}, None),
    (["--out-shard-size", "20K"], {"shard_size": 20_000}, None),
    (["--out-shard-size", "300m"], {"shard_size": 300_000_000}, None),
    (["--out-shard-size", "4096"], {"shard_size": 4096}, None),
    (["--out-shard-size", "0"], {"shard_size": sys.maxsize}, None),  # mergekit: no limit
    (["--copy-tokenizer"], {"copy_tokenizer": True}, None),
    (["--no-copy-tokenizer"], {"copy_tokenizer": False}, None),
    (["--write-model-card"], {"write_model_card": True}, None),
    (["--no-write-model-card"], {"write_model_card": False}, None),
    (["--random-seed", "7"], {"seed": 7}, None),
    (["-j", "3"], {}, 3),
    (["--num-threads", "2"], {}, 2),
    (["--safe-serialization", "--quiet", "--no-quiet"], {}, None),
])
def test_options_map_to_plan_keys(args: list[str], overrides: dict, threads: int | None) -> None:
    t = _translated(*args)
    assert (t.overrides, t.threads) == (overrides, threads)
    assert [n.split(":")[0] for n in t.notes] == (["--gpu-rich"] if "--gpu-rich" in args else [])


NOTED = [(["--low-cpu-memory"], "--low-cpu-memory: streammerge keeps only a few chunks in memory"),
         (["--lazy-unpickle"], "--lazy-unpickle: streammerge already reads every tensor lazily"),
         (["--read-to-gpu"], "--read-to-gpu: streammerge reads into host buffers"),
         (["--multi-gpu"], "--multi-gpu: streammerge merges one chunk at a time on one device"),
         (["--async-write"], "--async-write: streammerge already writes in a thread of its own"),
         (["--write-threads", "4"], "--write-threads: streammerge writes with one thread behind the merge"),
         (["--clone-tensors"], "--clone-tensors: streammerge writes every output tensor from its own buffer"),
         (["--trust-remote-code"], "--trust-remote-code: streammerge reads config.json and tensors only"),
         (["--lora-merge-cache", "/tmp/lc"], "--lora-merge-cache: streammerge folds LoRA adapters"),
         (["--lora-merge-dtype", "bfloat16"], "--lora-merge-dtype: streammerge adds an adapter's update"),
         (["-vv"], "-v: streammerge has one level of output")]


@pytest.mark.parametrize("args, note", NOTED)
def test_options_streammerge_already_does_get_one_note(args: list[str], note: str) -> None:
    t = _translated(*args)
    assert t.overrides == {} and len(t.notes) == 1 and t.notes[0].startswith(note)
    negated = [f"--no-{a[2:]}" for a in args if f"--no-{a[2:]}" in MERGEKIT_YAML_OPTIONS]
    assert _translated(*negated).notes == []


@pytest.mark.parametrize("args, message", [
    (["--device", "cuda:1"], "--device cuda:1: streammerge runs on the current CUDA device; select it with "
                             "CUDA_VISIBLE_DEVICES=1 and --device cuda"),
    (["--device", "mps"], "--device mps: streammerge runs its kernels on cpu or cuda; "
                          "use --device cpu, cuda or auto"),
    (["--no-safe-serialization"], "--no-safe-serialization: streammerge writes safetensors only "
                                  "(no pickled .bin output); drop the option"),
])
def test_what_streammerge_cannot_do_is_refused(args: list[str], message: str) -> None:
    with pytest.raises(PlanError) as e:
        _translated(*args)
    assert str(e.value) == message


def test_yaml_command_prints_each_note_once_and_quiet_silences_them(fp32_family: Family,
                                                                    tmp_path: Path) -> None:
    config = _write(tmp_path, _linear(fp32_family))
    noted = [a for args, _ in NOTED for a in args]
    loud = _yaml(config, tmp_path / "loud", *noted)
    assert loud.exit_code == 0, loud.output
    lines = loud.output.splitlines()
    for _, note in NOTED:
        assert sum(line.startswith(f"note: {note}") for line in lines) == 1, note
    assert "wrote " in loud.output
    quiet = _yaml(config, tmp_path / "quiet", *noted, "--quiet")
    assert quiet.exit_code == 0 and quiet.output == ""
    plain = CliRunner().invoke(main, ["run", str(config), str(tmp_path / "plain"), "-q"])
    assert plain.exit_code == 0
    assert _files(tmp_path / "loud") == _files(tmp_path / "quiet") == _files(tmp_path / "plain")


def test_no_safe_serialization_is_refused_in_one_line(fp32_family: Family, tmp_path: Path) -> None:
    config = _write(tmp_path, _linear(fp32_family))
    for invoke in (lambda *a: _yaml(*a), lambda *a: CliRunner().invoke(main, ["run", *map(str, a)])):
        result = invoke(config, tmp_path / "out", "--no-safe-serialization")
        assert result.exit_code == 1 and result.output == (
            "error: --no-safe-serialization: streammerge writes safetensors only (no pickled .bin output); "
            "drop the option\n")
        assert not (tmp_path / "out").exists()


def _shard_tensor_bytes(shard: Path) -> list[int]:
    """Each tensor's byte count, in file order, from the safetensors header."""
    raw = shard.read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    spans = sorted(v["data_offsets"] for k, v in header.items() if k != "__metadata__")
    return [end - start for start, end in spans]


def test_out_shard_size_is_bytes_in_mergekit_count_syntax(fp32_family: Family, tmp_path: Path) -> None:
    """--out-shard-size 20K: shards of at most 20 000 tensor bytes, each as full as the next tensor
    allows (mergekit's writer starts a shard when the next tensor would overflow this one)."""
    config = _write(tmp_path, _linear(fp32_family))
    result = _yaml(config, tmp_path / "out", "--out-shard-size", "20K", "-q")
    assert result.exit_code == 0, result.output
    shards = sorted((tmp_path / "out").glob("model-*.safetensors"))
    sizes = [_shard_tensor_bytes(s) for s in shards]
    assert len(shards) > 2 and all(sum(s) <= 20_000 for s in sizes)
    assert all(sum(a) + b[0] > 20_000 for a, b in zip(sizes, sizes[1:]))
    single = tmp_path / "single"
    assert _yaml(config, single, "--out-shard-size", "0", "-q").exit_code == 0
    assert [p.name for p in single.glob("*.safetensors")] == ["model.safetensors"]
    merged, whole = load_output(tmp_path / "out"), load_output(single)
    assert merged.keys() == whole.keys() and all(torch.equal(merged[k], whole[k]) for k in whole)


def test_random_seed_is_the_seed(fp32_family: Family, tmp_path: Path) -> None:
    config = _write(tmp_path, _linear(fp32_family, "dare_ties"))
    for name, args in {"a": ["--random-seed", "7"], "b": ["--random-seed", "8"]}.items():
        assert _yaml(config, tmp_path / name, *args, "-q").exit_code == 0
    native = CliRunner().invoke(main, ["run", str(config), str(tmp_path / "native"), "--seed", "7", "-q"])
    assert native.exit_code == 0
    assert _files(tmp_path / "a") == _files(tmp_path / "native") != _files(tmp_path / "b")


def test_seed_given_twice_must_agree(fp32_family: Family, tmp_path: Path) -> None:
    config = _write(tmp_path, _linear(fp32_family, "dare_ties"))
    run = main.commands["run"]
    clash = CliRunner().invoke(run, [str(config), str(tmp_path / "a"), "--seed", "1", "--random-seed", "2"])
    assert clash.exit_code == 1
    assert clash.output == "error: --seed 1 and --random-seed 2 disagree; give one of them\n"
    same = CliRunner().invoke(run, [str(config), str(tmp_path / "b"), "--seed", "2", "--random-seed", "2",
                                    "-q"])
    assert same.exit_code == 0, same.output


def test_no_copy_tokenizer_and_no_model_card_leave_their_files_out(fp32_family: Family,
                                                                   tmp_path: Path) -> None:
    config = _write(tmp_path, _linear(fp32_family))
    assert _yaml(config, tmp_path / "full", "-q").exit_code == 0
    full = sorted(p.name for p in (tmp_path / "full").iterdir())
    assert full == ["README.md", "config.json", "generation_config.json", "merge_config.json",
                    "model.safetensors", "streammerge-manifest.json", "streammerge_plan.yaml",
                    "tokenizer_config.json"]
    donor = fp32_family.models[0] / "tokenizer_config.json"
    assert (tmp_path / "full" / "tokenizer_config.json").read_bytes() == donor.read_bytes()
    run = main.commands["run"]
    for name, args, gone in [
        ("no_tok", ["--no-copy-tokenizer"], {"generation_config.json", "tokenizer_config.json"}),
        ("no_card", ["--no-write-model-card"], {"README.md"}),
    ]:
        for invoke, out in ((yaml_main, name), (run, f"{name}_run")):
            result = CliRunner().invoke(invoke, [str(config), str(tmp_path / out), *args, "-q"])
            assert result.exit_code == 0, result.output
            assert sorted(p.name for p in (tmp_path / out).iterdir()) == sorted(set(full) - gone)
            assert _files(tmp_path / out) == _files(tmp_path / "full")


def test_no_copy_tokenizer_drops_the_chat_template_with_a_warning(fp32_family: Family,
                                                                  tmp_path: Path) -> None:
    config = _write(tmp_path, _linear(fp32_family, chat_template="chatml"))
    result = _yaml(config, tmp_path / "out", "--no-copy-tokenizer", "-q")
    assert result.exit_code == 0
    assert result.output == ("warning: chat_template: not written: the plan builds no tokenizer and "
                             "copy_tokenizer is off (--no-copy-tokenizer); add 'tokenizer_source: base' to "
                             "write it\n")
    out = tmp_path / "out"
    assert not list(out.glob("*token*")) and not (out / "chat_template.jinja").exists()


def _with_architecture(family: Family, root: Path, architecture: str, model_type: str) -> Path:
    """The second fine-tune again, its config.json naming ``architecture``."""
    source = family.models[1]
    config = json.loads((source / "config.json").read_text())
    config |= {"architectures": [architecture], "model_type": model_type}
    return write_checkpoint(root / architecture, family.tensors[source], config)


def test_mixed_architectures_need_allow_crimes(fp32_family: Family, tmp_path: Path) -> None:
    mistral = _with_architecture(fp32_family, tmp_path, "MistralForCausalLM", "mistral")
    plan = _linear(fp32_family)
    plan["models"][1]["model"] = str(mistral)
    config = _write(tmp_path, plan)
    message = (f"error: inputs of different architectures: {fp32_family.models[0]} (LlamaForCausalLM), "
               f"{mistral} (MistralForCausalLM); mergekit refuses to mix them: add --allow-crimes "
               "(or 'allow_crimes: true' in the plan) to merge them anyway\n")
    for args in (["run", config, tmp_path / "a"], ["run", config, tmp_path / "a", "--no-allow-crimes"]):
        refused = CliRunner().invoke(main, [str(a) for a in args])
        assert refused.exit_code == 1 and refused.output == message
    refused = _yaml(config, tmp_path / "a")
    assert refused.exit_code == 1 and refused.output == message and not (tmp_path / "a").exists()
    planned = CliRunner().invoke(main, ["plan", str(config)])
    assert planned.exit_code == 1 and planned.output == message
    assert CliRunner().invoke(main, ["plan", str(config), "--allow-crimes"]).exit_code == 0
    assert _yaml(config, tmp_path / "crimes", "--allow-crimes", "-q").exit_code == 0
    native = _write(tmp_path, plan | {"allow_crimes": True}, "native.yml")
    assert CliRunner().invoke(main, ["run", str(native), str(tmp_path / "native"), "-q"]).exit_code == 0
    same = _write(tmp_path, _linear(fp32_family), "same.yml")
    assert CliRunner().invoke(main, ["run", str(same), str(tmp_path / "same"), "-q"]).exit_code == 0
    assert _files(tmp_path / "crimes") == _files(tmp_path / "native") == _files(tmp_path / "same")


@pytest.mark.parametrize("architecture, model_type", [
    ("LLaMaForCausalLM", "llama"),  # one mergekit definition names both spellings
    ("MyOwnForCausalLM", "llama"),  # no mergekit definition: mergekit infers one and does not compare
    ("PhiForCausalLM", "llama"),  # neither Phi definition expects this model_type: inferred as well
])
def test_architectures_mergekit_does_not_tell_apart_merge(architecture: str, model_type: str,
                                                          fp32_family: Family, tmp_path: Path) -> None:
    other = _with_architecture(fp32_family, tmp_path, architecture, model_type)
    plan = _linear(fp32_family)
    plan["models"][1]["model"] = str(other)
    result = CliRunner().invoke(main, ["run", str(_write(tmp_path, plan)), str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output


def _multi(family: Family, tmp_path: Path, final_first: bool) -> Path:
    """mergekit-multi: 'soup' (the mean of two fine-tunes), and an unnamed final merge that uses it."""
    soup = {"name": "soup", "merge_method": "linear", "dtype": "float32",
            "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in family.models[:2]]}
    final = {"merge_method": "task_arithmetic", "base_model": str(family.base), "dtype": "float32",
             "models": [{"model": "soup", "parameters": {"weight": 0.5}},
                        {"model": str(family.models[2]), "parameters": {"weight": 0.5}}]}
    docs = [final, soup] if final_first else [soup, final]
    path = tmp_path / "multi.yml"
    path.write_text("---\n".join(yaml.safe_dump(d) for d in docs))
    return path


def test_multi_writes_named_merges_to_the_intermediate_dir_in_dependency_order(fp32_family: Family,
                                                                               tmp_path: Path) -> None:
    f, t = fp32_family, fp32_family.tensors
    config, out, inter = _multi(f, tmp_path, final_first=True), tmp_path / "out", tmp_path / "inter"
    first = CliRunner().invoke(multi_main, [str(config), "--out-path", str(out), "-I", str(inter), "-q"])
    assert first.exit_code == 0, first.output
    mid, final = load_output(inter / "soup"), load_output(out)
    n = "model.layers.1.mlp.up_proj.weight"
    mean = (t[f.models[0]][n].double() + t[f.models[1]][n].double()) / 2
    assert torch.allclose(mid[n].double(), mean, atol=1e-7)
    base = t[f.base][n].double()
    want = base + 0.5 * (mid[n].double() - base) + 0.5 * (t[f.models[2]][n].double() - base)
    assert (final[n].double() - want).abs().max() < 1e-6
    written = (inter / "soup" / "model.safetensors", out / "model.safetensors")
    stamps = {p: p.stat().st_mtime_ns for p in written}
    lazy = CliRunner().invoke(multi_main, [str(config), "--out-path", str(out), "-I", str(inter)])
    assert lazy.exit_code == 0, lazy.output
    soup = inter.absolute() / "soup"
    assert f"(document 2): stage 'soup' is already merged in {soup}; skipping it" in lazy.output
    assert f"(document 1): the final merge is already merged in {out.absolute()}; skipping it" in lazy.output
    assert "wrote" not in lazy.output and all(p.stat().st_mtime_ns == s for p, s in stamps.items())
    again = CliRunner().invoke(multi_main, [str(config), "--out-path", str(out), "-I", str(inter),
                                            "--no-lazy"])
    assert again.exit_code == 0 and again.output.count("wrote ") == 2, again.output
    assert all(p.stat().st_mtime_ns != s for p, s in stamps.items())
    assert load_output(out)[n].equal(final[n])


def test_multi_refusals(fp32_family: Family, tmp_path: Path) -> None:
    config = _multi(fp32_family, tmp_path, final_first=False)
    missing = CliRunner().invoke(multi_main, [str(config), "-I", str(tmp_path / "i")])
    assert missing.exit_code == 1 and missing.output == (
        f"error: {config}: document 2 has no 'name:', so it is the final merge: give --out-path for it\n")
    docs = [d for d in yaml.safe_load_all(config.read_text())]
    docs[1]["name"] = "final"
    docs[0]["models"][0]["model"] = "final"  # soup uses final, final uses soup
    config.write_text("---\n".join(yaml.safe_dump(d) for d in docs))
    cycle = CliRunner().invoke(multi_main, [str(config), "-I", str(tmp_path / "i")])
    assert cycle.exit_code == 1 and cycle.output == (
        f"error: {config}: the documents use each other's outputs (soup -> final -> soup); "
        "remove the circular reference\n")
    assert not (tmp_path / "i").exists()


def test_console_scripts_and_core_dependencies() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    entry = {name: target.split(":") for name, target in project["scripts"].items()}
    loaded = {name: getattr(importlib.import_module(module), attr) for name, (module, attr) in entry.items()}
    assert loaded["streammerge-yaml"] is yaml_main and loaded["streammerge-multi"] is multi_main
    assert "tokenizers>=0.15" in project["dependencies"]
    # The old extra still installs.
    assert project["optional-dependencies"]["tokenizer"] == ["tokenizers>=0.15"]



def test_streammerge_yaml_runs_as_a_program(fp32_family: Family, tmp_path: Path) -> None:
    config = _write(tmp_path, _linear(fp32_family))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-c", "from streammerge.cli import yaml_main; yaml_main()", str(config),
            str(tmp_path / "out"), "--copy-tokenizer", "--allow-crimes", "--out-shard-size", "1B",
            "--lazy-unpickle", "--quiet"]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout == "" and done.stderr == "", done.stderr
    out = tmp_path / "out"
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("args", [["--cuda"], ["--gpu-rich"], ["--device", "cuda:0"]])
def test_cuda_options_merge_on_the_gpu(args: list[str], fp32_family: Family, tmp_path: Path) -> None:
    config = _write(tmp_path, _linear(fp32_family))
    result = _yaml(config, tmp_path / "out", *args)
    assert result.exit_code == 0, result.output
    assert "device: cuda:0" in result.output
