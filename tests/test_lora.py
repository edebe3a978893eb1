"""LoRA adapters: folding matches PEFT's merge_and_unload, several adapters merge as models reading
the base once, and combined adapters (cat, svd) are adapters PEFT loads with the expected ΔW."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import streammerge
from checkpoint_builder import Arch, Family, write_checkpoint, write_family
from conftest import load_output
from streammerge.cli import main
from streammerge.errors import CheckpointError, PlanError
from streammerge.io import reader as reader_module

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _adapter(base: Path, out: Path, seed: int, **config) -> dict[str, torch.Tensor]:
    """A random PEFT LoRA adapter of ``base`` saved to ``out``; returns PEFT's merge_and_unload state dict."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **config))
    for name, p in peft_model.named_parameters():  # B starts at zero in PEFT: give every factor weight
        if "lora_" in name:
            p.data.normal_(0, 0.05)
    peft_model.save_pretrained(out)
    return {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}


def _max_diff(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    return max((got[k].double() - want[k].double()).abs().max().item() for k in got)


def _gpt2(path: Path) -> Path:
    """A tiny GPT-2 (Conv1D layers: weights stored [in, out], so PEFT uses fan_in_fan_out)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32, vocab_size=80)
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    return path


FOLDS = {
    "plain": {"r": 4, "lora_alpha": 8, "target_modules": LLAMA_TARGETS},
    "rslora": {"r": 8, "lora_alpha": 4, "use_rslora": True, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "rank_and_alpha_pattern": {"r": 4, "lora_alpha": 8, "target_modules": LLAMA_TARGETS,
                               "rank_pattern": {"model.layers.0.self_attn.q_proj": 2, "up_proj": 6}, "alpha_pattern": {"v_proj": 3}},
    "embedding_and_modules_to_save": {"r": 4, "lora_alpha": 16, "target_modules": ["embed_tokens", "q_proj"], "modules_to_save": ["lm_head"]},
}


@pytest.mark.parametrize("kind", FOLDS)
def test_fold_matches_peft_merge_and_unload(kind: str, fp32_family: Family, tmp_path: Path) -> None:
    want = _adapter(fp32_family.base, tmp_path / "adapter", seed=1, **FOLDS[kind])
    if kind == "embedding_and_modules_to_save":  # a trained lm_head copy replaces the base's
        want = _resave_modules_to_save(tmp_path / "adapter", want)
    streammerge.merge({"base_model": str(fp32_family.base), "adapters": [{"path": str(tmp_path / "adapter")}]},
                      tmp_path / "out", quiet=True, chunk_size=7 * 32)
    got = load_output(tmp_path / "out")
    assert set(got) == set(fp32_family.tensors[fp32_family.base])
    assert _max_diff(got, want) < 1e-6
    changed = [k for k in got if not torch.equal(got[k], fp32_family.tensors[fp32_family.base][k])]
    assert changed and all(any(t in k for t in FOLDS[kind]["target_modules"] + ["lm_head"]) for k in changed)


def _resave_modules_to_save(adapter: Path, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Perturb the saved lm_head copy (PEFT saves it untrained here) and return the expected fold."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.weight"] = tensors["base_model.model.lm_head.weight"] + 0.5
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    return state | {"lm_head.weight": tensors["base_model.model.lm_head.weight"]}


def test_fold_fan_in_fan_out_matches_peft(tmp_path: Path) -> None:
    base = _gpt2(tmp_path / "gpt2")
    want = _adapter(base, tmp_path / "adapter", seed=2, r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    streammerge.merge({"merge_method": "passthrough", "models": [{"model": f"{base}+{tmp_path / 'adapter'}"}]}, tmp_path / "out", quiet=True)
    got = load_output(tmp_path / "out")
    assert _max_diff(got, want) < 1e-6
    assert not torch.equal(got["transformer.h.0.attn.c_attn.weight"], load_output(base)["transformer.h.0.attn.c_attn.weight"])


def _three_adapters(family: Family, root: Path) -> list[tuple[Path, dict[str, torch.Tensor]]]:
    out = []
    for k, targets in enumerate((LLAMA_TARGETS, ["q_proj", "v_proj"], ["v_proj", "down_proj", "up_proj"])):
        out.append((root / f"a{k}", _adapter(family.base, root / f"a{k}", seed=10 + k, r=4 + 2 * k, lora_alpha=8, target_modules=targets)))
    return out


@pytest.fixture(scope="module")
def adapters(fp32_family: Family, tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, dict[str, torch.Tensor]]]:
    return _three_adapters(fp32_family, tmp_path_factory.mktemp("adapters"))


def _rchar() -> int:
    return int(next(line for line in Path("/proc/self/io").read_text().splitlines() if line.startswith("rchar")).split()[1])


def test_ties_over_adapted_models_matches_ties_over_folded_models(fp32_family: Family, adapters: list, tmp_path: Path) -> None:
    config = json.loads((fp32_family.base / "config.json").read_text())
    folded = [write_checkpoint(tmp_path / f"folded{k}", {n: t for n, t in state.items() if n in fp32_family.tensors[fp32_family.base]}, config)
              for k, (_, state) in enumerate(adapters)]
    params = [{"weight": w, "density": d} for w, d in ((0.6, 0.5), (0.3, 0.7), (0.8, 0.4))]
    common = {"merge_method": "ties", "base_model": str(fp32_family.base), "parameters": {"normalize": True}}
    streammerge.merge(common | {"models": [{"model": str(f), "parameters": p} for f, p in zip(folded, params)]}, tmp_path / "want", quiet=True)
    streammerge.merge(common | {"adapters": [{"path": str(a), "weight": p["weight"], "parameters": {"density": p["density"]}}
                                             for (a, _), p in zip(adapters, params)]}, tmp_path / "got", quiet=True, chunk_size=24 * 32)
    assert _max_diff(load_output(tmp_path / "got"), load_output(tmp_path / "want")) < 1e-6


def _rchar() -> int:
    """Bytes this process has read through read/pread calls so far (Linux)."""
    return int(next(line for line in Path("/proc/self/io").read_text().splitlines() if line.startswith("rchar")).split()[1])


def test_several_adapters_read_the_base_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    family = write_family(tmp_path, Arch(hidden=256, intermediate=512, layers=2, vocab=256), n=0)
    paths = [tmp_path / f"a{k}" for k in range(3)]
    for k, p in enumerate(paths):
        _adapter(family.base, p, seed=20 + k, r=8, lora_alpha=8, target_modules=LLAMA_TARGETS)
    plan = {"base_model": str(family.base), "adapters": [{"path": str(p), "weight": 0.5} for p in paths]}
    mapped = []  # tensors are mapped, not read: count their bytes beside the read calls'
    real = reader_module._mapped
    monkeypatch.setattr(reader_module, "_mapped",
                        lambda fd, offset, n, path: mapped.append(n) or real(fd, offset, n, path))
    before = _rchar()
    streammerge.merge(plan, tmp_path / "out", quiet=True, chunk_size=64 * 256)  # several chunks per matrix
    read = _rchar() - before + sum(mapped)
    base_bytes = (family.base / "model.safetensors").stat().st_size
    adapter_bytes = sum((p / "adapter_model.safetensors").stat().st_size for p in paths)
    assert base_bytes + adapter_bytes <= read < 1.2 * base_bytes + adapter_bytes  # headers, configs and the card's fingerprints besides


def test_cat_adapter_matches_peft_add_weighted_adapter_and_loads_in_peft(fp32_family: Family, adapters: list, tmp_path: Path) -> None:
    weights = [0.7, -0.4, 1.5]
    plan = {"base_model": str(fp32_family.base), "adapter_output": {"combination": "cat"},
            "adapters": [{"path": str(a), "weight": w} for (a, _), w in zip(adapters, weights)]}
    streammerge.merge(plan, tmp_path / "cat", quiet=True)
    assert json.loads((tmp_path / "cat" / "adapter_config.json").read_text())["r"] == 4 + 6 + 8

    model = transformers.AutoModelForCausalLM.from_pretrained(fp32_family.base, dtype=torch.float32)
    want = peft.PeftModel.from_pretrained(model, adapters[0][0], adapter_name="a0")
    for k, (a, _) in enumerate(adapters[1:], 1):
        want.load_adapter(a, adapter_name=f"a{k}")
    want.add_weighted_adapter(["a0", "a1", "a2"], weights, "combined", combination_type="cat")
    got = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(fp32_family.base, dtype=torch.float32),
                                         tmp_path / "cat")
    streammerge.merge({"base_model": str(fp32_family.base), "adapters": [{"path": str(tmp_path / "cat")}]}, tmp_path / "folded", quiet=True)
    streammerge.merge({k: v for k, v in plan.items() if k != "adapter_output"}, tmp_path / "summed", quiet=True)
    assert _max_diff(load_output(tmp_path / "folded"), load_output(tmp_path / "summed")) < 1e-6  # the merged adapter folds in

    compared = 0
    for name, module in got.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and "default" in module.lora_A:
            peer = want.get_submodule(name)
            assert (module.get_delta_weight("default") - peer.get_delta_weight("combined")).abs().max() < 1e-6
            compared += 1
    assert compared == 3 * len(LLAMA_TARGETS)


def _delta(family: Family, model_dir: Path) -> dict[str, torch.Tensor]:
    got = load_output(model_dir)
    return {k: got[k].double() - family.tensors[family.base][k].double() for k in got}


def _adapter_delta(path: Path) -> dict[str, torch.Tensor]:
    """ΔW of a scaling-1 adapter written by streammerge, per base tensor."""
    from safetensors.torch import load_file

    t = load_file(path / "adapter_model.safetensors")
    prefix, suffix = "base_model.model.", ".lora_A.weight"
    return {k[len(prefix):-len(suffix)] + ".weight": t[k.replace("lora_A", "lora_B")].double() @ t[k].double()
            for k in t if k.endswith(suffix)}


@pytest.mark.parametrize("method,params", [("task_arithmetic", {}), ("ties", {"density": 0.6})])
def test_svd_adapter_has_the_error_truncation_predicts(method: str, params: dict, fp32_family: Family, adapters: list,
                                                       tmp_path: Path) -> None:
    entries = [{"path": str(a), "weight": w, "parameters": params} for (a, _), w in zip(adapters, (0.5, 1.0, 0.8))]
    base = {"base_model": str(fp32_family.base), "merge_method": method, "adapters": entries}
    streammerge.merge(base, tmp_path / "full", quiet=True, compute_dtype="float64")  # the merged ΔW, folded exactly
    exact = _delta(fp32_family, tmp_path / "full")
    rank = 5
    streammerge.merge(base | {"adapter_output": {"combination": "svd", "rank": rank}}, tmp_path / "svd", quiet=True)
    approx = _adapter_delta(tmp_path / "svd")
    assert set(approx) == {k for k, d in exact.items() if d.abs().max() > 0}
    for name, delta in approx.items():
        s = torch.linalg.svdvals(exact[name])
        predicted = s[rank:].square().sum().sqrt().item()
        error = torch.linalg.matrix_norm(exact[name] - delta).item()
        assert abs(error - predicted) <= 1e-5 * s[0].item() + 1e-6, name


def test_svd_of_a_clamped_sum_truncates_the_clamped_delta(fp32_family: Family, adapters: list,
                                                          tmp_path: Path) -> None:
    """task_arithmetic's clamp_min/clamp_max bound the dense merged ΔW; its rank-r adapter is
    that clamped ΔW truncated (the stacked factors alone would truncate the unclamped sum)."""
    entries = [{"path": str(a), "weight": w} for (a, _), w in zip(adapters, (0.5, 1.0, 0.8))]
    base = {"base_model": str(fp32_family.base), "merge_method": "task_arithmetic", "adapters": entries}
    streammerge.merge(base, tmp_path / "free", quiet=True, compute_dtype="float64")
    bound = 0.5 * max(d.abs().max().item() for d in _delta(fp32_family, tmp_path / "free").values())
    clamped = base | {"parameters": {"clamp_min": -bound, "clamp_max": bound}}
    streammerge.merge(clamped, tmp_path / "full", quiet=True, compute_dtype="float64")
    exact = _delta(fp32_family, tmp_path / "full")
    assert max(d.abs().max().item() for d in exact.values()) == pytest.approx(bound, rel=1e-6)  # it binds
    rank = 5
    streammerge.merge(clamped | {"adapter_output": {"combination": "svd", "rank": rank}}, tmp_path / "svd",
                      quiet=True)
    for name, delta in _adapter_delta(tmp_path / "svd").items():
        s = torch.linalg.svdvals(exact[name])
        predicted = s[rank:].square().sum().sqrt().item()
        error = torch.linalg.matrix_norm(exact[name] - delta).item()
        assert abs(error - predicted) <= 1e-5 * s[0].item() + 1e-6, name


def test_svd_clamp_bounds_the_factors(fp32_family: Family, adapters: list, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    plan = {"base_model": str(fp32_family.base), "adapter_output": {"combination": "svd", "rank": 4, "clamp": 0.9},
            "adapters": [{"path": str(a)} for a, _ in adapters]}
    streammerge.merge(plan, tmp_path / "svd", quiet=True)
    t = load_file(tmp_path / "svd" / "adapter_model.safetensors")
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    a, b = t[f"{q}.lora_A.weight"], t[f"{q}.lora_B.weight"]
    entries = torch.cat([b.flatten(), a.flatten()])
    bound = entries.max()  # the 0.9 quantile of the unclamped entries: the top tenth sit on it
    assert (entries == bound).float().mean() > 0.05 and entries.min() >= -bound


def test_adapter_for_another_shape_or_module_fails_naming_it(fp32_family: Family, tmp_path: Path) -> None:
    gpt2 = _gpt2(tmp_path / "gpt2")
    _adapter(gpt2, tmp_path / "gpt2-adapter", seed=3, r=2, lora_alpha=2, target_modules=["c_attn"])
    with pytest.raises(CheckpointError, match=r"module 'transformer\.h\.0\.attn\.c_attn'.*has no tensor"):
        streammerge.merge({"base_model": str(fp32_family.base), "adapters": [{"path": str(tmp_path / "gpt2-adapter")}]}, tmp_path / "o", quiet=True)
    _adapter(fp32_family.base, tmp_path / "ok", seed=3, r=2, lora_alpha=2, target_modules=["q_proj"])
    from safetensors.torch import load_file, save_file

    t = load_file(tmp_path / "ok" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    t[key] = torch.zeros(16, 2)
    save_file(t, tmp_path / "ok" / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=r"module 'model\.layers\.1\.self_attn\.q_proj' updates a \[16, 32\] weight.*\[32, 32\]"):
        streammerge.merge({"base_model": str(fp32_family.base), "adapters": [{"path": str(tmp_path / "ok")}]}, tmp_path / "o", quiet=True)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("change,message", [({"use_dora": True}, "use_dora is set"), ({"peft_type": "IA3"}, "peft_type 'IA3'")])
def test_unsupported_adapters_are_refused_on_the_command_line(change: dict, message: str, fp32_family: Family, tmp_path: Path) -> None:
    _adapter(fp32_family.base, tmp_path / "a", seed=4, r=2, lora_alpha=2, target_modules=["q_proj"])
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config | change))
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"merge_method: passthrough\nmodels:\n  - model: {fp32_family.base}+{tmp_path / 'a'}\n")
    result = CliRunner().invoke(main, ["run", str(plan), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and message in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("plan,message", [
    ({"models": [{"model": "x"}]}, "give 'adapters:' or 'models:'/'slices:', not both"),
    ({"adapter_output": {"combination": "cat"}, "merge_method": "ties"}, "'cat' is exact only for task_arithmetic"),
    ({"adapter_output": {"combination": "svd"}, "merge_method": "slerp", "parameters": {"t": 0.5}}, "cannot merge adapters into an adapter"),
    ({"adapters": [{"weight": 1.0}]}, r"adapters\[0\].path: Field required"),
    ({"adapter_output": {"combination": "cat", "rank": 4}}, "'rank' and 'clamp' apply to combination: svd"),
    ({"adapter_output": {"combination": "cat"}, "parameters": {"clamp_max": 0.1}},
     "clamp_max bounds each element of the merged task vector"),
    ({"merge_method": "linear"}, "linear would count base_model as one more model; .* use task_arithmetic"),
])
def test_adapter_plans_are_validated(plan: dict, message: str, fp32_family: Family, adapters: list, tmp_path: Path) -> None:
    full = {"base_model": str(fp32_family.base), "adapters": [{"path": str(adapters[0][0])}]} | plan
    with pytest.raises(PlanError, match=message):
        streammerge.merge(full, tmp_path / "out", quiet=True)


def test_a_fold_is_rounded_to_the_base_dtype_as_mergekit_hands_it_on(bf16_family: Family,
                                                                     tmp_path: Path) -> None:
    """mergekit folds `model+adapter` with PEFT into the model as stored (bf16 here) and merges that,
    so a float32 merge of it sees W + ΔW rounded to bf16, not the float32 sum."""
    from comparison import differing
    from family_builder import write_lora

    base = bf16_family.tensors[bf16_family.base]
    deltas = write_lora(tmp_path / "lora", "llama", base, seed=3)
    model = {"model": f"{bf16_family.base}+{tmp_path / 'lora'}", "parameters": {"weight": 1.0}}
    streammerge.merge({"merge_method": "linear", "dtype": "float32", "models": [model]}, tmp_path / "out",
                      quiet=True)
    got = load_output(tmp_path / "out")
    wide = {n: (base[n].double() + d).float() for n, d in deltas.items()}
    # The float32 sums need rounding.
    assert any(not torch.equal(w, w.bfloat16().float()) for w in wide.values())

    assert all(torch.equal(got[n], got[n].bfloat16().float()) for n in deltas)
    assert differing({n: got[n].bfloat16() for n in deltas}, {n: w.bfloat16() for n, w in wide.items()}) == 0
