"""The native `select` block: merge only some layers or modules, keep embeddings or head from the base."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import references as ref
import streammerge
from checkpoint_builder import Family
from conftest import load_output
from streammerge.errors import PlanError


def _plan(f: Family, select: dict, **extra) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(f.base), "select": select,
            "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in f.models]} | extra


def _merged(f: Family, name: str) -> torch.Tensor:
    t = f.tensors
    return ref.task_family(t[f.base][name], [t[m][name] for m in f.models], [0.5] * len(f.models))


def _check(out: dict[str, torch.Tensor], f: Family, merged: set[str]) -> None:
    for name, got in out.items():
        if name in merged:
            assert (got.double() - _merged(f, name)).abs().max() < 1e-6, name
        else:
            assert torch.equal(got, f.tensors[f.base][name].to(got.dtype)), name


def test_only_listed_layers_and_modules_are_merged(fp32_family: Family, tmp_path: Path) -> None:
    plan = _plan(fp32_family, {"layers": [0, 2], "modules": ["q_proj", "k_proj", "v_proj"]})
    streammerge.merge(plan, tmp_path / "out", quiet=True)
    out = load_output(tmp_path / "out")
    merged = {f"model.layers.{i}.self_attn.{m}.weight" for i in (0, 2) for m in ("q_proj", "k_proj", "v_proj")}
    _check(out, fp32_family, merged)
    assert len(out) == len(fp32_family.tensors[fp32_family.base])


def test_keep_embeddings_and_head_from_base_in_the_output_dtype(fp32_family: Family, tmp_path: Path) -> None:
    plan = _plan(fp32_family, {"keep_from_base": ["embeddings", "lm_head"]}, out_dtype="bfloat16")
    streammerge.merge(plan, tmp_path / "out", quiet=True)
    out = load_output(tmp_path / "out")
    assert all(t.dtype == torch.bfloat16 for t in out.values())
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(out[name], fp32_family.tensors[fp32_family.base][name].to(torch.bfloat16))
    n = "model.norm.weight"
    assert torch.equal(out[n], _merged(fp32_family, n).to(torch.bfloat16))


def test_a_layer_outside_the_model_is_named(fp32_family: Family, tmp_path: Path) -> None:
    with pytest.raises(PlanError, match=r"model has 3 layers \(0-2\), got 30"):
        streammerge.merge(_plan(fp32_family, {"layers": [1, 30]}), tmp_path / "out", quiet=True)


def test_module_kinds_name_the_same_tensors_as_fragments(fp32_family: Family, tmp_path: Path) -> None:
    by_kind = _plan(fp32_family, {"modules": ["q", "k", "v"]})
    by_name = _plan(fp32_family, {"modules": ["q_proj", "k_proj", "v_proj"]})
    streammerge.merge(by_kind, tmp_path / "a", quiet=True)
    streammerge.merge(by_name, tmp_path / "b", quiet=True)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    streammerge.merge(_plan(fp32_family, {"modules": ["mlp", "norm"]}), tmp_path / "c", quiet=True)
    merged = {n for n in fp32_family.tensors[fp32_family.base] if ".mlp." in n or "layernorm" in n}
    assert len(merged) == 3 * 5
    _check(load_output(tmp_path / "c"), fp32_family, merged)


@pytest.mark.parametrize("model_type,module,message", [
    ("phi3", "q", "phi3 has no separate 'q' projection (it fuses q, k and v: select 'qkv')"),
    ("made_up", "attention", "module kinds are known for"),
])
def test_module_kinds_missing_from_an_architecture_are_named(model_type: str, module: str, message: str) -> None:
    from streammerge.plan.architecture import module_fragments

    assert message in module_fragments(model_type, module)
    assert module_fragments("gpt2", "qkv") == ("attn.c_attn",) and module_fragments("phi3", "o_proj") == ("o_proj",)
