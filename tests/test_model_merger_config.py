"""The ``merge_config:`` front door (streammerge.frontdoors.model_merger): each strategy against the
native plan it stands for (byte-identical shards) and a float64 reference computed here; the YAML
file through ``streammerge run`` and the Python API; notes for the tool's memory keys; one-line
errors for what cannot be mapped."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner

import streammerge
from checkpoint_builder import Arch, Family, random_tensors, write_checkpoint
from conftest import load_output, merge_with_chunk_sizes
from streammerge import MergeConfig, ModelMerger
from streammerge.cli import main
from streammerge.errors import PlanError

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


def _exact(f: Family, path: Path) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in f.tensors[path].items()}


def _close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in got:
        torch.testing.assert_close(got[name].double(), want[name], rtol=1e-5, atol=2e-7, msg=name)


def _slerp(v0: torch.Tensor, v1: torch.Tensor, t: float, normalize: bool) -> torch.Tensor:
    """Whole-tensor slerp in float64; with ``normalize`` the unit directions are slerped and the
    norm is (1 − t)‖v0‖ + t‖v1‖."""
    n0, n1 = v0.norm().item(), v1.norm().item()
    theta = math.acos(max(-1.0, min(1.0, (v0 * v1).sum().item() / (n0 * n1))))
    a, b = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    if not normalize:
        return a * v0 + b * v1
    return ((1 - t) * n0 + t * n1) * (a * v0 / n0 + b * v1 / n1)


# strategy -> (merge_config keys, the native plan it must equal, the float64 reference)
def _weighted(pairs: tuple[tuple[Path | str, float], ...]) -> list[dict]:
    """Native model entries with weights."""
    return [{"model": str(m), "parameters": {"weight": w}} for m, w in pairs]


def _case(strategy: str, f: Family, variant: str) -> tuple[dict, dict, Any]:
    b, (m1, m2, m3) = f.base, f.models
    B, X1, X2, X3 = (_exact(f, p) for p in (b, m1, m2, m3))
    if strategy == "weighted":
        norm = variant != "raw"
        # subtract: c_2 = -|w_2|, and normalizing divides by the signed sum 0.5
        c2 = -0.4 if variant == "subtract" else 0.3
        second = {"weight": 0.4, "operation": "subtract"} if variant == "subtract" else {"weight": 0.3}
        cfg = {"models": [{"path": str(m1), "weight": 0.6, "name": "chat"}, {"path": str(m2), **second},
                          {"path": str(m3), "weight": 0.3}], "weighted_options": {"normalize_weights": norm}}
        native = {"merge_method": "linear", "parameters": {"normalize": norm},
                  "models": _weighted(((m1, 0.6), (m2, c2), (m3, 0.3)))}
        ref = {k: (0.6 * X1[k] + c2 * X2[k] + 0.3 * X3[k]) / ((0.9 + c2) if norm else 1) for k in B}
    elif strategy == "sequential":
        cfg = {"models": [{"path": str(m1)}, {"path": str(m2), "weight": 0.25},
                          {"path": str(m3), "weight": 0.6}]}
        native = {"merge_method": "sequential", "models": _weighted(((m1, 1.0), (m2, 0.25), (m3, 0.6)))}
        ref = {k: 0.4 * (0.75 * X1[k] + 0.25 * X2[k]) + 0.6 * X3[k] for k in B}
    elif strategy == "task_arithmetic":
        # subtract with a negative weight still subtracts: c = -|w|
        cfg = {"base_model": str(b), "models": [{"path": str(m1), "weight": 0.7},
                                                {"path": str(m2), "weight": -0.5, "operation": "subtract"},
                                                {"path": str(m3), "weight": 0.5, "operation": "subtract"}],
               "task_arithmetic_options": {"scaling_factor": 1.5, "clamp_weights": variant == "clamp"}}
        clamp = {"clamp_min": -0.004, "clamp_max": 0.003} if variant == "clamp" else {}
        if clamp:
            cfg["task_arithmetic_options"]["clamp_range"] = [-0.004, 0.003]
        native = {"merge_method": "task_arithmetic", "base_model": str(b),
                  "parameters": {"lambda": 1.5, "normalize": False, **clamp},
                  "models": _weighted(((m1, 0.7), (m2, -0.5), (m3, -0.5)))}

        def ta(k: str) -> torch.Tensor:
            mixed = 1.5 * (0.7 * (X1[k] - B[k]) - 0.5 * (X2[k] - B[k]) - 0.5 * (X3[k] - B[k]))
            return B[k] + (mixed.clamp(-0.004, 0.003) if clamp else mixed)
        ref = {k: ta(k) for k in B}
    else:
        normalize = variant == "normalize"
        cfg = {"models": [{"path": str(m1)}, {"path": str(m3)}], "slerp_factor": 0.3,
               "slerp_options": {"interpolation_factor": 0.3, "normalize_before_slerp": normalize,
                                 "epsilon": "1e-8"}}  # as YAML reads 1e-8: a string
        native = {"merge_method": "slerp_eps", "base_model": str(m1),
                  "parameters": {"t": 0.3, "epsilon": 1e-8, "normalize": normalize},
                  "models": [{"model": str(m1)}, {"model": str(m3)}]}
        ref = {k: _slerp(X1[k], X3[k], 0.3, normalize) for k in B}
    return {"strategy": strategy, **cfg}, native, ref


CASES = [("weighted", ""), ("weighted", "raw"), ("weighted", "subtract"), ("sequential", ""),
         ("task_arithmetic", ""), ("task_arithmetic", "clamp"), ("slerp", ""), ("slerp", "normalize")]


@pytest.mark.parametrize(("strategy", "variant"), CASES)
def test_strategy_equals_its_native_plan_and_the_reference(strategy: str, variant: str, fp32_family: Family,
                                                           tmp_path: Path) -> None:
    cfg, native, ref = _case(strategy, fp32_family, variant)
    result = ModelMerger(MergeConfig(**cfg, output_path=str(tmp_path / "mm"))).merge(quiet=True)
    assert result.output == tmp_path / "mm"
    streammerge.merge({**native, "output": str(tmp_path / "native")}, quiet=True)
    assert _shards(tmp_path / "mm") == _shards(tmp_path / "native")
    _close(load_output(tmp_path / "mm"), ref)


def test_clamp_bounds_the_moved_distance(fp32_family: Family, tmp_path: Path) -> None:
    cfg, _, _ = _case("task_arithmetic", fp32_family, "clamp")
    ModelMerger({**cfg, "output_path": str(tmp_path / "c")}).merge(quiet=True)
    free = {**cfg, "task_arithmetic_options": {"scaling_factor": 1.5}, "output_path": str(tmp_path / "u")}
    ModelMerger(free).merge(quiet=True)
    base = _exact(fp32_family, fp32_family.base)
    clamped, free = load_output(tmp_path / "c"), load_output(tmp_path / "u")
    name = "model.layers.0.mlp.up_proj.weight"
    moved, unclamped = clamped[name].double() - base[name], free[name].double() - base[name]
    assert moved.min().item() >= -0.004 - 1e-9 and moved.max().item() <= 0.003 + 1e-9
    assert unclamped.min().item() < -0.004 and unclamped.max().item() > 0.003  # the clamp binds


def test_slerp_normalize_interpolates_the_norm_linearly(fp32_family: Family, tmp_path: Path) -> None:
    cfg, _, _ = _case("slerp", fp32_family, "normalize")
    ModelMerger({**cfg, "output_path": str(tmp_path / "o")}).merge(quiet=True)
    name = "model.layers.1.self_attn.q_proj.weight"
    v0, v1 = (_exact(fp32_family, p)[name] for p in (fp32_family.models[0], fp32_family.models[2]))
    got = load_output(tmp_path / "o")[name].double()
    assert got.norm().item() == pytest.approx(0.7 * v0.norm().item() + 0.3 * v1.norm().item(), rel=1e-6)


def test_slerp_eps_does_not_depend_on_the_chunk_size(fp32_family: Family, tmp_path: Path) -> None:
    _, native, _ = _case("slerp", fp32_family, "normalize")
    first, *others = merge_with_chunk_sizes(native, tmp_path)
    assert all(o == first for o in others)


def test_slerp_eps_lerps_below_epsilon(fp32_family: Family, tmp_path: Path) -> None:
    """An epsilon above sin θ of every tensor makes every tensor the lerp (1 − t)·v0 + t·v1."""
    cfg, _, _ = _case("slerp", fp32_family, "")
    cfg["slerp_options"] = {"epsilon": 0.9}
    ModelMerger({**cfg, "output_path": str(tmp_path / "o")}).merge(quiet=True)
    v0, v1 = (_exact(fp32_family, p) for p in (fp32_family.models[0], fp32_family.models[2]))
    _close(load_output(tmp_path / "o"), {k: 0.7 * v0[k] + 0.3 * v1[k] for k in v0})


@pytest.mark.parametrize(("strategy", "base"), [("task_arithmetic", True), *((s, b) for s in (
    "weighted", "sequential", "slerp") for b in (True, False))])
def test_unmerged_embeddings_and_head_come_from_the_base_else_the_first_model(
        strategy: str, base: bool, fp32_family: Family, tmp_path: Path) -> None:
    """base_model is task_arithmetic's base, and the others' donor: config.json, tokenizer and the
    tensors not merged are its, though it is not merged."""
    cfg, _, ref = _case(strategy, fp32_family, "")
    if base:
        cfg["base_model"] = str(fp32_family.base)
    elif "base_model" in cfg:
        del cfg["base_model"]
    options = {"merge_embeddings": False, "merge_lm_head": False}
    ModelMerger({**cfg, "options": options, "output_path": str(tmp_path / "o")}).merge(quiet=True)
    got = load_output(tmp_path / "o")
    donor = fp32_family.base if base else fp32_family.models[0]
    for name in (EMBED, HEAD):
        assert torch.equal(got[name], fp32_family.tensors[donor][name])
    _close({k: v for k, v in got.items() if k not in (EMBED, HEAD)},
           {k: v for k, v in ref.items() if k not in (EMBED, HEAD)})
    assert json.loads((tmp_path / "o" / "tokenizer_config.json").read_text())["marker"] == donor.name


def test_donor_plan_equals_the_translation_and_is_checked(fp32_family: Family, tmp_path: Path) -> None:
    cfg, native, _ = _case("weighted", fp32_family, "")
    ModelMerger({**cfg, "base_model": str(fp32_family.base), "options": {"merge_lm_head": False},
                 "output_path": str(tmp_path / "mm")}).merge(quiet=True)
    donated = {**native, "donor": str(fp32_family.base), "select": {"keep_from_base": ["lm_head"]}}
    streammerge.merge(donated, tmp_path / "native", quiet=True)
    assert _shards(tmp_path / "mm") == _shards(tmp_path / "native")
    wide = Arch(vocab=100)  # the same architecture, another vocabulary
    other = write_checkpoint(tmp_path / "wide", random_tensors(wide.shapes()), wide.config(torch.float32))
    for plan, message in (
            ({**donated, "donor": str(other)},
             f"donor: 'lm_head.weight' of {other} is [100, 32], the output's 'lm_head.weight' is [96, 32]; "
             "choose a donor of the merged models' shapes"),
            ({"merge_method": "linear", "donor": str(fp32_family.base), "slices": [{"sources": [
                {"model": str(m), "layer_range": [0, 3], "parameters": {"weight": 1.0}}
                for m in fp32_family.models]}]},
             "plan: 'donor' needs a 'models:' plan (slices and modules renumber or split the layers it would "
             "lend)"),
            ({**donated, "tokenizer_source": "base"},
             "'donor' lends its tokenizer files and rows as they are; a built tokenizer ('tokenizer_source' "
             "or 'tokenizer:') re-indexes them: give one of the two")):
        with pytest.raises(PlanError) as e:
            streammerge.merge(plan, tmp_path / "bad", quiet=True)
        assert str(e.value).endswith(message)


def test_yaml_file_runs_with_streammerge_run_and_the_python_api(fp32_family: Family, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    root = fp32_family.base.parent
    doc = {"merge_config": {
        "strategy": "task_arithmetic", "output_path": str(tmp_path / "merged_model"), "base_model": "./base",
        "models": [{"path": "./ft1", "weight": 0.6, "name": "chat_specialist"},
                   {"path": "./ft2", "weight": 0.4, "operation": "subtract"}],
        "options": {"normalize_weights": True, "preserve_tokenizer": True, "merge_embeddings": True,
                    "merge_lm_head": True, "torch_dtype": "bfloat16"},
        "task_arithmetic_options": {"scaling_factor": 1.0, "clamp_weights": True, "clamp_range": [-2.0, 2.0]},
        "low_memory_mode": True, "device_map": "auto", "batch_size": 4}}
    config = root / "merge.yaml"  # relative paths are read from the file's directory
    config.write_text(yaml.safe_dump(doc))
    monkeypatch.chdir(tmp_path)
    run = CliRunner().invoke(main, ["run", str(config)])
    assert run.exit_code == 0, run.output
    out = tmp_path / "merged_model"
    streams = "streammerge always streams one tensor chunk at a time"
    for line in ("note: normalize_weights: used by strategy weighted only; task_arithmetic does not divide "
                 "by the weights",
                 f"note: low_memory_mode: {streams}, in bounded memory (--max-memory sets the budget)",
                 f"note: batch_size: {streams}; there are no batches to size",
                 f"note: torch_dtype: bfloat16: the output is written in bfloat16 ({streams}; nothing is "
                 "loaded in it)",
                 f"note: models' names label them only: chat_specialist (./ft1)"):
        assert line in run.output.splitlines()
    assert "note: device_map: " in run.output
    native = {"merge_method": "task_arithmetic", "base_model": str(fp32_family.base), "out_dtype": "bfloat16",
              "parameters": {"lambda": 1.0, "normalize": False, "clamp_min": -2.0, "clamp_max": 2.0},
              "models": [{"model": str(fp32_family.models[0]), "parameters": {"weight": 0.6}},
                         {"model": str(fp32_family.models[1]), "parameters": {"weight": -0.4}}]}
    streammerge.merge(native, tmp_path / "native", quiet=True)
    assert _shards(out) == _shards(tmp_path / "native")
    assert json.loads((out / "tokenizer_config.json").read_text())["marker"] == "base"
    assert load_output(out)[EMBED].dtype == torch.bfloat16
    # -o wins over output_path; the same file through the Python API and a JSON spelling
    assert CliRunner().invoke(main, ["run", str(config), "-o", str(tmp_path / "o2"), "-q"]).exit_code == 0
    assert _shards(tmp_path / "o2") == _shards(out)
    as_json = root / "merge.json"
    as_json.write_text(json.dumps(doc))
    ModelMerger(MergeConfig.from_yaml(as_json)).merge(tmp_path / "o3", quiet=True)
    streammerge.merge(config, tmp_path / "o4", quiet=True)
    assert _shards(tmp_path / "o3") == _shards(tmp_path / "o4") == _shards(out)


def test_preserve_tokenizer_false_writes_no_tokenizer(fp32_family: Family, tmp_path: Path) -> None:
    cfg, _, _ = _case("weighted", fp32_family, "")
    ModelMerger({**cfg, "options": {"preserve_tokenizer": False},
                 "output_path": str(tmp_path / "o")}).merge(quiet=True)
    assert not (tmp_path / "o" / "tokenizer_config.json").exists()
    ModelMerger({**cfg, "output_path": str(tmp_path / "t")}).merge(quiet=True)
    assert json.loads((tmp_path / "t" / "tokenizer_config.json").read_text())["marker"] == "ft1"


def _err(cfg: dict, tmp_path: Path) -> str:
    with pytest.raises(PlanError) as e:
        ModelMerger({**cfg, "output_path": str(tmp_path / "o")}).merge(quiet=True)
    assert not (tmp_path / "o").exists()
    assert "\n" not in str(e.value)
    return str(e.value)


BAD = [
    ({"weight_decay": 0.01}, "merge_config.weight_decay: 0.01: a merge trains nothing, so weight "
                             "decay has no meaning here; set it to 0 or drop it"),
    ({"options": {"weight_decay": 0.1}}, "merge_config.weight_decay: 0.1: a merge trains nothing"),
    ({"learning_rate": 1e-5}, "merge_config.learning_rate: unknown key (valid: base_model, models, options,"),
    ({"options": {"fuse": True}}, "merge_config.options.fuse: unknown key (valid: normalize_weights, "
                                  "preserve_tokenizer, merge_embeddings, merge_lm_head, low_memory_mode,"),
    ({"strategy": "ties"}, "merge_config.strategy: unknown strategy 'ties' (valid: weighted, sequential, "
                           "task_arithmetic, slerp)"),
    ({"strategy": "task_arithmetic"}, "merge_config.base_model: missing: task_arithmetic adds the models' "
                                      "differences from base_model to it; give base_model"),
    ({"strategy": "slerp"}, "merge_config.models: slerp interpolates between exactly 2 models, got 3"),
    ({"strategy": "sequential",
      "models": [{"path": "M1"}, {"path": "M2", "weight": 0.5, "operation": "subtract"}]},
     "merge_config.models[1].operation: subtract is a weight's sign: it needs strategy weighted or "
     "task_arithmetic (this merge is sequential)"),
    ({"models": [{"path": "M1", "weight": 0.5}, {"path": "M2", "weight": 0.5, "operation": "subtract"}]},
     "merge_config.models: the signed weights [0.5, -0.5] sum to 0, so they cannot be normalized; set "
     "weighted_options.normalize_weights: false, or change a weight"),
    ({"models": [{"path": "M1", "weight": 0.5, "operation": "negate"}]},
     "merge_config.models[0].operation: got 'negate', expected add or subtract"),
    ({"models": [{"path": "M1", "weight": "heavy"}]},
     "merge_config.models[0].weight: expected a number, got 'heavy'"),
    ({"models": [{"path": "M1", "scale": 2}]},
     "merge_config.models[0].scale: unknown key (valid: path, weight, name, operation)"),
    ({"options": {"normalize_weights": True}, "weighted_options": {"normalize_weights": False}},
     "merge_config.weighted_options.normalize_weights: {'options.normalize_weights': True, "
     "'weighted_options.normalize_weights': False} disagree; give one of them"),
    ({"torch_dtype": "int8"},
     "merge_config.torch_dtype: got 'int8', expected one of bfloat16, float16, float32, float64 or auto"),
    ({"validation": {"run_tests": True}}, "merge_config.validation.test_prompts: run_tests: true needs "
                                          "test_prompts to continue"),
]


@pytest.mark.parametrize(("change", "message"), BAD)
def test_bad_inputs_are_one_line_errors(change: dict, message: str, fp32_family: Family,
                                        tmp_path: Path) -> None:
    cfg, _, _ = _case("weighted", fp32_family, "")
    if "models" in change:
        change = {**change, "models": [{**m, "path": str(fp32_family.models[0])} for m in change["models"]]}
    assert message in _err({**cfg, **change}, tmp_path)


def test_task_arithmetic_and_slerp_errors(fp32_family: Family, tmp_path: Path) -> None:
    cfg, _, _ = _case("task_arithmetic", fp32_family, "")
    assert _err({**cfg, "task_arithmetic_options": {"clamp_weights": True}}, tmp_path).endswith(
        "task_arithmetic_options.clamp_range: clamp_weights needs clamp_range: [low, high], got None")
    assert _err({**cfg, "task_arithmetic_options": {"clamp_range": [-1, 1]}}, tmp_path).endswith(
        "clamp_range: given without clamp_weights: true; set clamp_weights: true to clamp, or drop it")
    cfg, _, _ = _case("sequential", fp32_family, "")
    cfg["models"][2]["weight"] = 1.5
    assert _err(cfg, tmp_path).endswith("merge_config.models[2].weight: got 1.5, expected 0 <= weight <= 1 "
                                        "(how far the result moves towards this model)")
    cfg, _, _ = _case("slerp", fp32_family, "")
    assert _err({**cfg, "slerp_factor": 0.6}, tmp_path).endswith(
        "merge_config.slerp_factor: {'slerp_factor': 0.6, 'slerp_options.interpolation_factor': 0.3} "
        "disagree; give one of them")
    assert _err({**cfg, "slerp_factor": 1.5, "slerp_options": {}}, tmp_path).endswith(
        "merge_config.slerp_factor: got 1.5, expected 0 <= t <= 1 (0: the first model, 1: the second)")


def test_cli_error_is_one_line(fp32_family: Family, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"merge_config": {
        "strategy": "weighted", "output_path": str(tmp_path / "o"),
        "models": [{"path": str(fp32_family.models[0])}], "weight_decay": 0.5}}))
    run = CliRunner().invoke(main, ["run", str(path)])
    assert run.exit_code == 1
    assert run.output == (f"error: {path}: merge_config.weight_decay: 0.5: a merge trains nothing, so weight "
                          "decay has no meaning here; set it to 0 or drop it\n")


def test_notes_for_keys_of_other_strategies_and_unused_weights(fp32_family: Family, tmp_path: Path) -> None:
    cfg, _, _ = _case("sequential", fp32_family, "")
    cfg["models"][0]["weight"] = 0.9
    result = ModelMerger({**cfg, "slerp_options": {"epsilon": 1e-6}, "weight_decay": 0,
                          "use_safetensors": True, "peft_config": {"merge_adapters": True},
                          "options": {"normalize_weights": False},
                          "output_path": str(tmp_path / "o")}).merge(quiet=True)
    m1 = fp32_family.models[0]
    assert result.notes[:6] == (
        "slerp_options: used by strategy slerp only; this merge is sequential",
        "weight_decay: 0: a merge trains nothing; no effect",
        "use_safetensors: streammerge reads safetensors (and .bin files without running pickle code) and "
        "always writes safetensors",
        "peft_config: no model is a PEFT adapter directory (adapter_config.json); every model is merged "
        "as it is",
        "normalize_weights: used by strategy weighted only; sequential does not divide by the weights",
        f"models[0].weight: the first model starts the sequence (r = {m1}); its weight is not used")


@pytest.fixture(scope="module")
def adapted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A tiny Llama with a tokenizer and two PEFT LoRA adapters of it."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from arch_builder import build_model, write_adapter

    root = tmp_path_factory.mktemp("adapted")
    base = build_model(root, "llama")
    return base, write_adapter(root, base, 1), write_adapter(root, base, 2)


def test_adapters_fold_into_base_model_path_and_validation_generates(adapted: tuple[Path, Path, Path],
                                                                     tmp_path: Path) -> None:
    from arch_builder import folded_model, reference_generate

    base, a1, a2 = adapted
    prompts = ["the river of stone", "a man"]
    cfg = {"strategy": "weighted",
           "models": [{"path": str(a1), "weight": 0.7}, {"path": str(a2), "weight": 0.3}],
           "peft_config": {"merge_adapters": True, "adapter_names": ["default"],
                           "base_model_path": str(base)},
           "validation": {"run_tests": True, "test_prompts": prompts, "max_new_tokens": 5},
           "output_path": str(tmp_path / "o")}
    ModelMerger(cfg).merge(quiet=True)
    native = {"merge_method": "linear", "models": [{"model": f"{base}+{a}", "parameters": {"weight": w}}
                                                   for a, w in ((a1, 0.7), (a2, 0.3))]}
    streammerge.merge(native, tmp_path / "native", quiet=True)
    assert _shards(tmp_path / "o") == _shards(tmp_path / "native")
    # the weighted average of the models PEFT's merge_and_unload makes of each adapter
    f1, f2 = (load_output(folded_model(tmp_path, base, a)) for a in (a1, a2))
    _close(load_output(tmp_path / "o"), {k: (0.7 * f1[k].double() + 0.3 * f2[k].double()) for k in f1})
    saved = json.loads((tmp_path / "o" / "validation.json").read_text())
    assert [g["prompt"] for g in saved["generations"]] == prompts
    assert [g["tokens"] for g in saved["generations"]] == reference_generate(tmp_path / "o", prompts, 5)


def test_adapters_without_a_base_path_combine_into_an_adapter(adapted: tuple[Path, Path, Path],
                                                              tmp_path: Path) -> None:
    base, a1, a2 = adapted
    cfg = {"strategy": "task_arithmetic", "base_model": str(base),
           "models": [{"path": str(a1), "weight": 0.7},
                      {"path": str(a2), "weight": 0.2, "operation": "subtract"}],
           "peft_config": {"merge_adapters": True}, "output_path": str(tmp_path / "o")}
    ModelMerger(cfg).merge(quiet=True)
    native = {"merge_method": "task_arithmetic", "base_model": str(base),
              "parameters": {"lambda": 1.0, "normalize": False},
              "adapters": [{"path": str(a1), "weight": 0.7}, {"path": str(a2), "weight": -0.2}],
              "adapter_output": {"combination": "cat"}}
    streammerge.merge(native, tmp_path / "native", quiet=True)
    assert (tmp_path / "o" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "native" / "adapter_model.safetensors").read_bytes()
    assert _err({**cfg, "peft_config": {}}, tmp_path / "e").endswith(
        f"merge_config.models[0].path: {a1} is a PEFT adapter (adapter_config.json): set "
        "peft_config.merge_adapters: true to merge adapters")


def test_validation_without_transformers_names_the_extra_before_merging(
        fp32_family: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "v.yaml"
    path.write_text(yaml.safe_dump({"merge_config": {
        "strategy": "weighted", "output_path": str(tmp_path / "o"),
        "models": [{"path": str(fp32_family.models[0])}],
        "validation": {"run_tests": True, "test_prompts": ["a man"]}}}))
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    run = CliRunner().invoke(main, ["run", str(path)])
    assert run.exit_code == 1
    assert run.output == (f"error: {path}: merge_config.validation.run_tests: generating from the merged "
                          "model needs transformers: pip install 'streammerge[eval]'\n")
    assert not (tmp_path / "o").exists()


def test_plan_command_shows_the_translated_schedule_and_notes(fp32_family: Family, tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"merge_config": {
        "strategy": "slerp", "slerp_factor": 0.25, "output_path": str(tmp_path / "o"),
        "gradient_checkpointing": True, "models": [{"path": str(m)} for m in fp32_family.models[:2]]}}))
    run = CliRunner().invoke(main, ["plan", str(path)])
    assert run.exit_code == 0, run.output
    note = "note          gradient_checkpointing: a merge computes no gradients; no effect"
    assert note in run.output.splitlines()
    assert "slerp_eps" in run.output
    assert not (tmp_path / "o").exists()


def test_weighted_adapters_combine_as_their_weighted_average(adapted: tuple[Path, Path, Path],
                                                             tmp_path: Path) -> None:
    base, a1, a2 = adapted
    cfg = {"strategy": "weighted", "base_model": str(base), "peft_config": {"merge_adapters": True},
           "models": [{"path": str(a1), "weight": 3.0}, {"path": str(a2), "weight": 1.0}]}
    result = ModelMerger({**cfg, "output_path": str(tmp_path / "o")}).merge(quiet=True)
    assert not any(n.startswith("base_model") for n in result.notes)
    native = {"merge_method": "task_arithmetic", "base_model": str(base), "parameters": {"normalize": True},
              "adapters": [{"path": str(a1), "weight": 3.0}, {"path": str(a2), "weight": 1.0}],
              "adapter_output": {"combination": "cat"}}
    streammerge.merge(native, tmp_path / "native", quiet=True)
    assert (tmp_path / "o" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "native" / "adapter_model.safetensors").read_bytes()
    assert _err({**cfg, "strategy": "slerp"}, tmp_path / "e").endswith(
        "merge_config.peft_config.base_model_path: missing: strategy slerp of adapters is merged on their "
        "base model; give it here (without it only weighted and task_arithmetic combine the adapters into "
        "one adapter)")


@pytest.mark.parametrize("strategy", ["weighted", "task_arithmetic"])
def test_the_issue_example_runs_as_written(strategy: str, adapted: tuple[Path, Path, Path], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The example config of the tool's documentation (every key), on adapters of a tiny Llama, through
    streammerge run: as written (weighted, whose subtract makes the normalized coefficients 3 and -2),
    and as task_arithmetic."""
    from arch_builder import reference_generate

    base, a1, a2 = adapted
    config = tmp_path / "merge_config.yaml"
    config.write_text(f"""merge_config:
  strategy: {strategy}
  output_path: ./merged_model
  base_model: {base}
  models:
    - {{path: {a1}, weight: 0.6, name: chat_specialist}}
    - {{path: {a2}, weight: 0.4, operation: subtract}}
  options: {{normalize_weights: true, preserve_tokenizer: true, merge_embeddings: true, merge_lm_head: true}}
  weighted_options: {{normalize_weights: true}}
  task_arithmetic_options: {{scaling_factor: 1.0, clamp_weights: true, clamp_range: [-2.0, 2.0]}}
  slerp_options: {{interpolation_factor: 0.5, normalize_before_slerp: true, epsilon: 1e-8}}
  slerp_factor: 0.5
  peft_config: {{merge_adapters: true, adapter_names: [default], base_model_path: {base}}}
  validation: {{run_tests: true, test_prompts: ["the river of stone"]}}
""")
    monkeypatch.chdir(tmp_path)
    run = CliRunner().invoke(main, ["run", str(config)])
    assert run.exit_code == 0, run.output
    other = "task_arithmetic_options" if strategy == "weighted" else "weighted_options"
    owner = "task_arithmetic" if strategy == "weighted" else "weighted"
    notes = [f"note: {other}: used by strategy {owner} only; this merge is {strategy}",
             f"note: slerp_options: used by strategy slerp only; this merge is {strategy}",
             f"note: slerp_factor: used by strategy slerp only; this merge is {strategy}",
             f"note: models' names label them only: chat_specialist ({a1})"]
    models = _weighted(((f"{base}+{a1}", 0.6), (f"{base}+{a2}", -0.4)))
    if strategy == "weighted":
        notes.append("note: operation: subtract: weighted merges Σ c_i x_i with the coefficients (3, -2), "
                     "normalized to sum to 1: an extrapolation away from the subtracted models")
        native = {"merge_method": "linear", "donor": str(base), "parameters": {"normalize": True},
                  "models": models}
    else:
        native = {"merge_method": "task_arithmetic", "base_model": str(base), "models": models,
                  "parameters": {"lambda": 1.0, "normalize": False, "clamp_min": -2.0, "clamp_max": 2.0}}
    for note in notes:
        assert note in run.output.splitlines()
    streammerge.merge(native, tmp_path / "native", quiet=True)
    out = tmp_path / "merged_model"
    assert _shards(out) == _shards(tmp_path / "native")
    saved = json.loads((out / "validation.json").read_text())["generations"]
    assert [g["tokens"] for g in saved] == reference_generate(out, ["the river of stone"], 32)
