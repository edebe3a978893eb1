"""modules: a multi-module (vision-language) checkpoint, each module merged as its own models/slices plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import streammerge
from checkpoint_builder import write_checkpoint
from conftest import load_output
from streammerge.errors import PlanError

HIDDEN, VISION = 8, 6


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    """A mistral3-layout model: a 3-layer text decoder, a 2-layer vision tower and a projector."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"language_model.model.embed_tokens.weight": (20, HIDDEN), "language_model.model.norm.weight": (HIDDEN,),
              "language_model.lm_head.weight": (20, HIDDEN), "vision_tower.patch_conv.weight": (VISION, 3),
              "vision_tower.ln_pre.weight": (VISION,), "multi_modal_projector.linear_1.weight": (HIDDEN, VISION),
              "multi_modal_projector.linear_2.weight": (HIDDEN, HIDDEN)}
    for i in range(3):
        shapes |= {f"language_model.model.layers.{i}.self_attn.q_proj.weight": (HIDDEN, HIDDEN),
                   f"language_model.model.layers.{i}.mlp.up_proj.weight": (2 * HIDDEN, HIDDEN)}
    for i in range(2):
        shapes |= {f"vision_tower.transformer.layers.{i}.attention.q_proj.weight": (VISION, VISION),
                   f"vision_tower.transformer.layers.{i}.ffn_norm.weight": (VISION,)}
    return {k: torch.randn(v, generator=g, dtype=torch.float64) for k, v in shapes.items()}


CONFIG = {"architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3",
          "text_config": {"model_type": "mistral", "num_hidden_layers": 3, "vocab_size": 20},
          "vision_config": {"model_type": "pixtral", "num_hidden_layers": 2}}


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict, dict]:
    root = tmp_path_factory.mktemp("modules")
    a, b = _tensors(1), _tensors(2)
    return write_checkpoint(root / "a", a, CONFIG), write_checkpoint(root / "b", b, CONFIG), a, b


def _plan(a: Path, b: Path, **modules) -> dict:
    return {"merge_method": "linear", "dtype": "float32", "compute_dtype": "float64", "parameters": {"weight": 1.0},
            "modules": {"text_decoder": {"models": [{"model": str(a), "parameters": {"weight": 1.0}}, {"model": str(b), "parameters": {"weight": 3.0}}]},
                        "vision_tower": {"slices": [{"sources": [{"model": str(a), "layer_range": [0, 1]}, {"model": str(b), "layer_range": [1, 2]}]}],
                                         "parameters": {"weight": [{"filter": "ffn_norm", "value": 0.25}, {"value": 0.5}]}},
                        "multi_modal_projector": {"models": [{"model": str(a)}, {"model": str(b)}],
                                                  "parameters": {"weight": [{"filter": "linear_1", "value": 2.0}]}}} | modules}


def test_each_module_merges_as_its_own_plan(two, tmp_path: Path) -> None:
    a_path, b_path, a, b = two
    streammerge.merge(_plan(a_path, b_path), tmp_path / "out", quiet=True)
    out = load_output(tmp_path / "out")
    f = lambda t: t.float().double()  # noqa: E731  (inputs as stored)
    want = {}
    for name in a:
        if name.startswith("language_model."):
            want[name] = (f(a[name]) + 3 * f(b[name])) / 4
    want["vision_tower.transformer.layers.0.attention.q_proj.weight"] = (  # a's layer 0 with b's layer 1, module weights
        f(a["vision_tower.transformer.layers.0.attention.q_proj.weight"]) + f(b["vision_tower.transformer.layers.1.attention.q_proj.weight"])) / 2
    want["vision_tower.transformer.layers.0.ffn_norm.weight"] = (
        f(a["vision_tower.transformer.layers.0.ffn_norm.weight"]) + f(b["vision_tower.transformer.layers.1.ffn_norm.weight"])) / 2
    for name in ("vision_tower.patch_conv.weight", "vision_tower.ln_pre.weight",  # the module's weights, equal: the mean
                 "multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_2.weight"):
        want[name] = (f(a[name]) + f(b[name])) / 2
    assert sorted(out) == sorted(want)
    for name, w in want.items():
        assert torch.equal(out[name], w.float()), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 3 and config["vision_config"]["num_hidden_layers"] == 1


def test_module_parameters_rank_below_the_models_and_above_the_plan(two, tmp_path: Path) -> None:
    """linear_1: the projector's 2.0 for both models (equal); the models' own weights beat it in the text decoder."""
    a_path, b_path, a, b = two
    plan = _plan(a_path, b_path)
    plan["modules"]["multi_modal_projector"]["models"][1]["parameters"] = {"weight": 6.0}
    streammerge.merge(plan, tmp_path / "out", quiet=True)
    out = load_output(tmp_path / "out")
    n = "multi_modal_projector.linear_1.weight"
    assert torch.equal(out[n], ((2 * a[n].float().double() + 6 * b[n].float().double()) / 8).float())
    n = "multi_modal_projector.linear_2.weight"  # no module value: the plan's weight 1.0 for a, 6.0 for b
    assert torch.equal(out[n], ((a[n].float().double() + 6 * b[n].float().double()) / 7).float())


@pytest.mark.parametrize("change, message", [
    ({"speech_encoder": {"models": [{"model": "A"}]}}, "'speech_encoder' is not one"),
    ({"vision_tower": None}, "'vision_tower' is missing"),
])
def test_modules_must_name_the_architecture_s_modules(two, tmp_path: Path, change: dict, message: str) -> None:
    a_path, b_path, _, _ = two
    plan = _plan(a_path, b_path)
    for name, module in change.items():
        if module is None:
            del plan["modules"][name]
        else:
            plan["modules"][name] = {"models": [{"model": str(a_path)}]}
    with pytest.raises(PlanError, match=f"mistral3 has the modules text_decoder, multi_modal_projector, vision_tower; {message}"):
        streammerge.merge(plan, tmp_path / "out", quiet=True)


def test_a_single_module_architecture_is_the_default_module(fp32_family, tmp_path: Path) -> None:
    models = [{"model": str(m), "parameters": {"weight": 1.0}} for m in fp32_family.models[:2]]
    streammerge.merge({"merge_method": "linear", "modules": {"default": {"models": models}}}, tmp_path / "a", quiet=True)
    streammerge.merge({"merge_method": "linear", "models": models}, tmp_path / "b", quiet=True)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
