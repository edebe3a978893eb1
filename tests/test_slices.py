"""`slices:` configs: layer ranges, stacking with renumbering, slice-level parameters and base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import references as ref
import streammerge
from checkpoint_builder import Family
from conftest import load_output
from streammerge.errors import PlanError


def test_stacked_slices_renumber_layers_and_update_the_config(fp32_family: Family, tmp_path: Path) -> None:
    a, b = fp32_family.models[0], fp32_family.models[1]
    plan = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(b), "layer_range": [1, 3], "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]}}]},
    ]}
    streammerge.merge(plan, tmp_path / "out", quiet=True)
    out = load_output(tmp_path / "out")
    ta, tb = fp32_family.tensors[a], fp32_family.tensors[b]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 5
    assert torch.equal(out["model.layers.2.mlp.up_proj.weight"], ta["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(out["model.layers.3.mlp.up_proj.weight"], tb["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(out["model.layers.4.self_attn.o_proj.weight"], tb["model.layers.2.self_attn.o_proj.weight"] * 0.5)
    assert torch.equal(out["model.embed_tokens.weight"], ta["model.embed_tokens.weight"])  # first slice
    assert torch.equal(out["lm_head.weight"], tb["lm_head.weight"])  # last slice
    assert torch.equal(out["model.norm.weight"], tb["model.norm.weight"])
    assert len(out) == 2 + 1 + 5 * 9


def test_a_merging_slice_uses_slice_positions_for_gradients(fp32_family: Family, tmp_path: Path) -> None:
    """One slice over layers 1-2 of two models: t runs 0 → 1 over the slice's 2 layers."""
    a, b = fp32_family.models[1], fp32_family.models[2]
    plan = {"merge_method": "slerp", "base_model": str(a), "parameters": {"t": [0.2, 0.8]}, "slices": [
        {"sources": [{"model": str(a), "layer_range": [1, 3]}, {"model": str(b), "layer_range": [1, 3]}]}]}
    streammerge.merge(plan, tmp_path / "out", quiet=True)
    out = load_output(tmp_path / "out")
    name = "mlp.down_proj.weight"
    ta, tb = fp32_family.tensors[a], fp32_family.tensors[b]
    for j, t in ((0, 0.2), (1, 0.8)):
        want = ref.slerp(ta[f"model.layers.{j + 1}.{name}"], tb[f"model.layers.{j + 1}.{name}"], t)
        assert (out[f"model.layers.{j}.{name}"].double() - want).abs().max() < 1e-6
    want = ref.slerp(ta["lm_head.weight"], tb["lm_head.weight"], 0.2)  # outside the layers: position 0
    assert (out["lm_head.weight"].double() - want).abs().max() < 1e-6
    assert "model.layers.2.mlp.up_proj.weight" not in out


def test_slice_parameters_sit_between_model_and_global(fp32_family: Family, tmp_path: Path) -> None:
    base, m = fp32_family.base, fp32_family.models[0]
    plan = {"merge_method": "task_arithmetic", "base_model": str(base), "parameters": {"weight": 0.1}, "slices": [
        {"sources": [{"model": str(base), "layer_range": [0, 3]}, {"model": str(m), "layer_range": [0, 3]}],
         "parameters": {"weight": 0.5}}]}
    streammerge.merge(plan, tmp_path / "out", quiet=True)
    out = load_output(tmp_path / "out")
    n = "model.layers.1.mlp.up_proj.weight"
    want = ref.task_family(fp32_family.tensors[base][n], [fp32_family.tensors[m][n]], [0.5])
    assert (out[n].double() - want).abs().max() < 1e-6


@pytest.mark.parametrize("slices,message", [
    ([{"sources": [{"model": "M0", "layer_range": [1, 5]}]}], "the model has 3 layers (0-2)"),
    ([{"sources": [{"model": "M0", "layer_range": [0, 2]}, {"model": "M1", "layer_range": [0, 3]}]}], "same number of layers"),
    ([{"sources": [{"model": "M0", "layer_range": [2, 1]}]}], "layer_range [2, 1] must be [start, end)"),
])
def test_bad_slices_are_named(slices: list, message: str, fp32_family: Family, tmp_path: Path) -> None:
    for s in slices:
        for src in s["sources"]:
            src["model"] = str(fp32_family.models[int(src["model"][1])])
    with pytest.raises(PlanError) as e:
        streammerge.merge({"merge_method": "linear", "slices": slices, "parameters": {"weight": 1.0}}, tmp_path / "o", quiet=True)
    assert message in str(e.value)
    assert not (tmp_path / "o").exists()
