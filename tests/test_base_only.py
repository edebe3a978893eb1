"""A config with no model besides its base, as mergekit 0.1.5 runs it: `base_model: X+adapter` with
that same `X+adapter` as its only model (or slice source) bakes the LoRA into X. And a slice's base
is one of its sources, or nothing: mergekit adds base_model to a `models:` list only.

mergekit's task-vector methods (task_arithmetic, ties, dare_*, breadcrumbs*, della*, sce, ram,
ramplus_tl) return the base when they have no task vector, and linear, karcher and passthrough
count the base as their one model: each writes the adapted base. slerp, nearswap, arcee_fusion,
model_stock, nuslerp and multislerp refuse too few inputs. (Checked by running mergekit 0.1.5 on
the golden Llama with a rank-4 adapter: every output equal, bit for bit, to W + (alpha/r)·B·A.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import streammerge
from checkpoint_builder import Family
from conftest import load_output
from streammerge.cli import main
from streammerge.errors import PlanError

TARGETS = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
WEIGHTED = {"task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
            "della_linear", "linear", "sequential"}
WRITE_THE_BASE = sorted(WEIGHTED | {"sce", "ram", "ramplus_tl", "karcher", "passthrough"})


def _lora(family: Family, out: Path, r: int = 4, alpha: int = 8) -> dict[str, torch.Tensor]:
    """A PEFT LoRA adapter of the family's base, written by hand; returns the folded base,
    W + (alpha/r)·B·A, computed here. alpha/r = 2 scales exactly, so the order of the products
    does not change a bit."""
    g = torch.Generator().manual_seed(7)
    base = family.tensors[family.base]
    tensors, folded = {}, dict(base)
    for name in base:
        if not name.endswith(".weight") or not any(t in name for t in TARGETS):
            continue
        rows, cols = base[name].shape
        a, b = 0.05 * torch.randn(r, cols, generator=g), 0.05 * torch.randn(rows, r, generator=g)
        key = "base_model.model." + name.removesuffix(".weight")
        tensors |= {f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}
        folded[name] = base[name] + (alpha / r) * (b @ a)
    out.mkdir()
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha,
        "target_modules": [t.split(".")[-1] for t in TARGETS],
        "base_model_name_or_path": str(family.base), "fan_in_fan_out": False, "bias": "none"}))
    return folded


def _plan(method: str, base: str, **extra: object) -> dict:
    own = {"weight": 1.0} if method in WEIGHTED else {}
    params = {"t": 0.5} if method in ("slerp", "nearswap") else {}
    return {"merge_method": method, "base_model": base, "models": [{"model": base, "parameters": own}],
            "parameters": params} | extra


@pytest.fixture(scope="module")
def adapted(fp32_family: Family,
            tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, torch.Tensor]]:
    """``X+adapter`` and its fold."""
    adapter = tmp_path_factory.mktemp("lora") / "adapter"
    folded = _lora(fp32_family, adapter)
    return f"{fp32_family.base}+{adapter}", folded


@pytest.mark.parametrize("method", WRITE_THE_BASE)
def test_the_adapted_base_alone_is_written(method: str, adapted: tuple[str, dict[str, torch.Tensor]],
                                           fp32_family: Family, tmp_path: Path) -> None:
    ref, folded = adapted
    result = streammerge.merge(_plan(method, ref), tmp_path / "out", quiet=True)
    got = load_output(tmp_path / "out")
    assert set(got) == set(folded)
    assert [k for k in folded if not torch.equal(got[k], folded[k])] == []
    changed = [k for k, v in fp32_family.tensors[fp32_family.base].items() if not torch.equal(folded[k], v)]
    # The adapter's modules, and only those.
    assert len(changed) == len(TARGETS) * fp32_family.arch.layers
    # linear, karcher and passthrough merge their one model; the rest write the base.
    if method not in ("linear", "karcher", "passthrough"):

        assert any(n.startswith(f"{len(folded)} tensors are base_model's")
                   for n in result.notes), result.notes


@pytest.mark.parametrize("method", ["task_arithmetic", "dare_ties"])
def test_the_only_slice_source_is_the_adapted_base(method: str, adapted: tuple[str, dict[str, torch.Tensor]],
                                                   fp32_family: Family, tmp_path: Path) -> None:
    ref, folded = adapted
    own = {"weight": 1.0}
    plan = {"merge_method": method, "base_model": ref,
            "slices": [{"sources": [{"model": ref, "layer_range": [0, fp32_family.arch.layers],
                                     "parameters": own}]}]}
    streammerge.merge(plan, tmp_path / "out", quiet=True)
    got = load_output(tmp_path / "out")
    assert set(got) == set(folded) and all(torch.equal(got[k], folded[k]) for k in folded)


def test_a_plain_base_alone_is_written_byte_for_byte(fp32_family: Family, tmp_path: Path) -> None:
    streammerge.merge(_plan("ties", str(fp32_family.base)), tmp_path / "out", quiet=True)
    base = fp32_family.tensors[fp32_family.base]
    got = load_output(tmp_path / "out")
    assert set(got) == set(base) and all(torch.equal(got[k], base[k]) for k in base)


def test_the_base_is_rounded_to_dtype_then_out_dtype(adapted: tuple[str, dict[str, torch.Tensor]],
                                                     tmp_path: Path) -> None:
    """mergekit loads the base in `dtype` and writes it in `out_dtype`: bfloat16 values in float32."""
    ref, folded = adapted
    plan = _plan("task_arithmetic", ref, dtype="bfloat16", out_dtype="float32")
    streammerge.merge(plan, tmp_path / "out", quiet=True)

    got = load_output(tmp_path / "out")
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], folded[k].bfloat16().float())
               for k in folded)
    assert any(not torch.equal(folded[k].bfloat16().float(), folded[k]) for k in folded)


def test_slices_with_only_the_base_keep_it_and_the_others_merge(fp32_family: Family, tmp_path: Path) -> None:
    """Per slice, as mergekit: layers 0 and 2 (and the embeddings, norm and head, taken from the first
    and last slices) are the base's; layer 1 is base + w·(ft − base)."""
    base, ft = (str(p) for p in (fp32_family.base, fp32_family.models[0]))
    plan = {"merge_method": "task_arithmetic", "base_model": base, "slices": [
        {"sources": [{"model": base, "layer_range": [0, 1]}]},
        {"sources": [{"model": base, "layer_range": [1, 2]},
                     {"model": ft, "layer_range": [1, 2], "parameters": {"weight": 0.7}}]},
        {"sources": [{"model": base, "layer_range": [2, 3]}]}]}
    streammerge.merge(plan, tmp_path / "out", quiet=True)
    got = load_output(tmp_path / "out")
    b, f = fp32_family.tensors[fp32_family.base], fp32_family.tensors[fp32_family.models[0]]
    for name, value in b.items():
        want = value + (f[name] - value) * 0.7 if name.startswith("model.layers.1.") else value
        assert torch.equal(got[name], want), name


@pytest.mark.parametrize(("method", "message"), [
    ("slerp", "models: slerp merges exactly 2 models including base_model, got 1"),
    ("nearswap", "models: nearswap merges exactly 2 models including base_model, got 1"),
    ("arcee_fusion", "models: arcee_fusion merges exactly 2 models including base_model, got 1"),
    ("model_stock", "models: model_stock needs at least 2 model(s) besides base_model, got 0"),
    ("nuslerp", "models: nuslerp needs at least 2 model(s) besides base_model, got 0"),
    ("multislerp", "models: multislerp needs at least 1 model(s) besides base_model, got 0"),
])
def test_methods_mergekit_refuses_with_the_base_alone_are_refused(
        method: str, message: str, adapted: tuple[str, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    plan = _plan(method, adapted[0])
    if method in ("nuslerp", "multislerp"):
        plan["models"][0]["parameters"] = {"weight": 1.0}
    with pytest.raises(PlanError) as err:
        streammerge.merge(plan, tmp_path / "out", quiet=True)
    assert str(err.value) == message
    assert not (tmp_path / "out").exists()


def test_cli_bakes_the_adapter_from_a_mergekit_config(adapted: tuple[str, dict[str, torch.Tensor]],
                                                      tmp_path: Path) -> None:
    ref, folded = adapted
    config = tmp_path / "bake.yml"
    config.write_text(f"merge_method: task_arithmetic\nbase_model: {ref}\nmodels:\n  - model: {ref}\n"
                      "    parameters:\n      weight: 1.0\ndtype: float32\n")
    result = CliRunner().invoke(main, ["run", str(config), str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    got = load_output(tmp_path / "out")
    assert all(torch.equal(got[k], folded[k]) for k in folded)
    (tmp_path / "slerp.yml").write_text(f"merge_method: slerp\nbase_model: {ref}\nmodels:\n  - model: {ref}\n"
                                        "parameters: {t: 0.5}\n")
    result = CliRunner().invoke(main, ["run", str(tmp_path / "slerp.yml"), str(tmp_path / "o2")])
    assert result.exit_code == 1
    assert result.output == "error: models: slerp merges exactly 2 models including base_model, got 1\n"


@pytest.mark.parametrize("method", ["passthrough", "linear"])
def test_a_slice_ignores_a_base_it_does_not_name_for_methods_without_one(method: str, fp32_family: Family,
                                                                        tmp_path: Path) -> None:
    """mergekit 0.1.5 adds base_model to a `models:` list, never to a slice: a frankenmerge that sets
    base_model stacks its sources' layers as it would without it (embeddings from the first slice,
    norm and head from the last)."""
    base, (m1, m2) = str(fp32_family.base), (str(m) for m in fp32_family.models[:2])
    own = {"weight": 1.0} if method == "linear" else {}
    plan = {"merge_method": method, "base_model": base, "slices": [
        {"sources": [{"model": m1, "layer_range": [0, 2], "parameters": own}]},
        {"sources": [{"model": m2, "layer_range": [1, 3], "parameters": own}]}]}
    streammerge.merge(plan, tmp_path / "out", quiet=True)
    got = load_output(tmp_path / "out")
    t1, t2 = fp32_family.tensors[fp32_family.models[0]], fp32_family.tensors[fp32_family.models[1]]
    want = {"model.embed_tokens.weight": t1["model.embed_tokens.weight"],
            "model.norm.weight": t2["model.norm.weight"], "lm_head.weight": t2["lm_head.weight"]}
    for out_layer, (t, layer) in enumerate([(t1, 0), (t1, 1), (t2, 1), (t2, 2)]):
        prefix = f"model.layers.{layer}."
        want |= {k.replace(prefix, f"model.layers.{out_layer}."): v
                 for k, v in t.items() if k.startswith(prefix)}
    assert set(got) == set(want) and [k for k in want if not torch.equal(got[k], want[k])] == []


@pytest.mark.parametrize("method", ["ties", "nuslerp"])
def test_a_slice_without_its_base_is_refused(method: str, fp32_family: Family, tmp_path: Path) -> None:
    base, m1, m2 = (str(p) for p in (fp32_family.base, *fp32_family.models[:2]))
    plan = {"merge_method": method, "base_model": base, "slices": [{"sources": [
        {"model": m, "layer_range": [0, 3], "parameters": {"weight": 0.5}} for m in (m1, m2)]}]}
    with pytest.raises(PlanError) as err:
        streammerge.merge(plan, tmp_path / "out", quiet=True)
    assert str(err.value) == (f"slices[0]: base_model {base} is not one of the slice's sources: "
                              "add it, with the slice's layer_range, as mergekit 0.1.5 requires")

