"""Mixture-of-experts checkpoints as published (one tensor per expert): Mixtral and Qwen3-MoE merge
with every method, keep the inputs' tensor names, load in transformers with the reference's logits,
and give mergekit 0.1.5's tensors (tests/data/golden_moe, made by scripts/moe_golden.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import method_cases
import references as ref
import streammerge
from checkpoint_builder import Family, write_family
from conftest import load_output
from moe_builder import MoEArch, arch_of, fused_state_dict
from streammerge.errors import PlanError
from streammerge.plan.architecture import filter_name, layer_index

FAMILIES = ("mixtral", "qwen3_moe")
GOLDEN = Path(__file__).parent / "data" / "golden_moe"


@pytest.fixture(scope="module", params=FAMILIES)
def moe(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Family:
    """Base and three fine-tunes, float32, each in two index-linked shards."""
    return write_family(tmp_path_factory.mktemp(request.param), MoEArch(request.param), n=3, shards=2)


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return got.shape == want.shape and (got.double() - want).abs().max().item() < 1e-6


def _merge(moe: Family, method: str, extra: dict, out: Path, **options: str) -> dict[str, torch.Tensor]:
    """``method`` over the family with method_cases' parameters: weights 0.6, 0.3, 0.5, density 0.5,
    t 0.4 (as many fine-tunes as the method takes)."""
    plan = method_cases.plan(method, extra, moe.base, moe.models, "float32")
    streammerge.merge(plan, out, quiet=True, **options)
    return load_output(out)


def _case_id(value: str | dict) -> str:
    return value if isinstance(value, str) else "-".join(value) or "defaults"


@pytest.mark.parametrize(("name", "extra"), method_cases.plan_cases(), ids=_case_id)
def test_every_method_merges_and_keeps_the_tensor_names(moe: Family, name: str, extra: dict,
                                                        tmp_path: Path) -> None:
    out = _merge(moe, name, extra, tmp_path / "out")
    base = moe.tensors[moe.base]
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == {k: (v.shape, v.dtype) for k, v in base.items()}
    assert all(torch.isfinite(v).all() for v in out.values())
    if name != "passthrough":  # the experts were merged, not copied
        assert any(not torch.equal(out[n], base[n]) for n in out if ".experts." in n)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config == json.loads((moe.base / "config.json").read_text())


def _reference(moe: Family, method: str, name: str) -> torch.Tensor:
    """The float64 reference of ``method`` (method_cases' parameters) for one tensor."""
    t = moe.tensors
    base, models = t[moe.base][name], [t[m][name] for m in moe.models]
    ws = [0.6, 0.3, 0.5]
    if method == "linear":
        return ref.linear(models, ws)
    if method == "ties":
        return ref.task_family(base, models, ws, sparsify="magnitude", densities=[0.5] * 3, consensus=True,
                               normalize=True)
    return ref.slerp(base, models[0], 0.4)


@pytest.mark.parametrize("method", ["linear", "ties", "slerp"])
def test_merged_experts_equal_the_reference(moe: Family, method: str, tmp_path: Path) -> None:
    """Each expert's tensor is merged on its own, under its own name."""
    out = _merge(moe, method, {}, tmp_path / "out")
    bad = [n for n in out if not _close(out[n], _reference(moe, method, n))]
    assert not bad, bad[:3]
    assert sum(".experts." in n for n in out) == 3 * moe.arch.layers * moe.arch.experts


def _logits(model: torch.nn.Module, vocab: int) -> torch.Tensor:
    ids = torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits


def _reference_model(path: Path, arch: MoEArch, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A model built from ``path``'s config with ``state`` (published layout) loaded, fused here."""
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    fused = {k: v.float() for k, v in fused_state_dict(arch, state).items()}
    missing, unexpected = model.load_state_dict(fused, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return model


def test_merged_moe_loads_in_transformers_with_the_reference_logits(moe: Family, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    _merge(moe, "ties", {}, tmp_path / "out", shard_size="40KB")
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    merged, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32,
                                                                      output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    state = {n: _reference(moe, "ties", n) for n in moe.tensors[moe.base]}
    reference = _reference_model(moe.base, moe.arch, state)
    base = _reference_model(moe.base, moe.arch, moe.tensors[moe.base])
    got, want = _logits(merged.eval(), moe.arch.vocab), _logits(reference, moe.arch.vocab)
    assert got.shape == (2, 12, moe.arch.vocab)
    assert (got - want).abs().max().item() < 1e-5
    assert (got - _logits(base, moe.arch.vocab)).abs().max().item() > 1e-3  # the merge changed the model


def test_sliced_passthrough_stacks_layers_with_all_their_experts(moe: Family, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    a, b = moe.models[0], moe.models[1]
    plan = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(b), "layer_range": [1, 3]}]}]}
    streammerge.merge(plan, tmp_path / "out", quiet=True)
    out = load_output(tmp_path / "out")
    # output layers 0-1 are a's layers 0-1, output layers 2-3 are b's layers 1-2, every expert in place
    want = {n: v for n, v in moe.tensors[a].items() if layer_index(n) in (0, 1)}
    want |= {re.sub(r"layers\.(\d)\.", lambda m: f"layers.{int(m.group(1)) + 1}.", n): v
             for n, v in moe.tensors[b].items() if layer_index(n) in (1, 2)}
    want |= {n: moe.tensors[a if "embed" in n else b][n] for n in moe.tensors[a] if layer_index(n) is None}
    assert out.keys() == want.keys()
    assert all(torch.equal(out[n], want[n]) for n in want)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 4
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    arch = MoEArch(moe.arch.family, layers=4)
    reference = _reference_model(tmp_path / "out", arch, want)
    assert (_logits(merged, arch.vocab) - _logits(reference, arch.vocab)).abs().max().item() < 1e-5


def test_gradients_and_select_layers_follow_the_layer_not_the_expert(moe: Family, tmp_path: Path) -> None:
    """A weight gradient over 3 layers and ``select.layers: [1, 2]`` on a model with 4 experts a layer."""
    base, m = moe.base, moe.models[0]
    plan = {"merge_method": "task_arithmetic", "base_model": str(base), "select": {"layers": [1, 2]},
            "models": [{"model": str(m), "parameters": {"weight": [0.0, 1.0]}}]}
    streammerge.merge(plan, tmp_path / "out", quiet=True)
    out = load_output(tmp_path / "out")
    t = moe.tensors
    for layer, weight in ((1, 0.5), (2, 1.0)):
        for e in range(moe.arch.experts):
            n = moe.arch.expert(layer, e, "down")
            assert _close(out[n], ref.task_family(t[base][n], [t[m][n]], [weight])), n
    assert all(torch.equal(out[n], t[base][n]) for n in out if layer_index(n) == 0)


@pytest.mark.parametrize(("module", "merged"), [
    ("experts", r"\.experts\.\d+\."), ("router", r"\.gate\.weight$"), ("mlp", r"\.(experts\.\d+|gate)\."),
    ("attention", r"self_attn\."),
])
def test_select_modules_has_expert_and_router_kinds(moe: Family, module: str, merged: str,
                                                    tmp_path: Path) -> None:
    base, m = moe.base, moe.models[0]
    plan = {"merge_method": "task_arithmetic", "base_model": str(base), "select": {"modules": [module]},
            "models": [{"model": str(m), "parameters": {"weight": 1.0}}]}
    streammerge.merge(plan, tmp_path / "out", quiet=True)
    out = load_output(tmp_path / "out")
    changed = {n for n in out if not torch.equal(out[n], moe.tensors[base][n])}
    assert changed == {n for n in out if re.search(merged, n)}
    assert all(_close(out[n], moe.tensors[m][n].double()) for n in changed)


def test_a_dense_model_has_no_experts_to_select(fp32_family: Family, tmp_path: Path) -> None:
    plan = {"merge_method": "linear", "select": {"modules": ["experts"]},
            "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in fp32_family.models]}
    message = ("select.modules: 'experts': llama has no 'experts': it is not a mixture-of-experts model "
               "(select 'mlp')")
    with pytest.raises(PlanError, match=re.escape(message)):
        streammerge.merge(plan, tmp_path / "out", quiet=True)


@pytest.mark.parametrize(("model_type", "name", "seen"), [
    ("mixtral", "block_sparse_moe.experts.3.w1.weight", "mlp.experts.gate_up_proj"),
    ("mixtral", "block_sparse_moe.experts.3.w3.weight", "mlp.experts.gate_up_proj"),
    ("mixtral", "block_sparse_moe.experts.3.w2.weight", "mlp.experts.down_proj"),
    ("mixtral", "block_sparse_moe.gate.weight", "mlp.gate.weight"),
    ("qwen3_moe", "mlp.experts.11.gate_proj.weight", "mlp.experts.gate_up_proj"),
    ("qwen3_moe", "mlp.experts.11.up_proj.weight", "mlp.experts.gate_up_proj"),
    ("qwen3_moe", "mlp.experts.11.down_proj.weight", "mlp.experts.down_proj"),
    ("qwen3_moe", "self_attn.q_norm.weight", "self_attn.q_norm.weight"),
    ("llama", "mlp.gate_proj.weight", "mlp.gate_proj.weight"),
])
def test_filters_see_the_names_mergekit_gives_the_experts(model_type: str, name: str, seen: str) -> None:
    assert filter_name(model_type, f"model.layers.7.{name}") == f"model.layers.7.{seen}"
    assert layer_index(f"model.layers.7.{name}") == 7


CASES = sorted(p.name for p in (GOLDEN / "cases").iterdir())


def _family(case: str) -> str:
    return next(f for f in FAMILIES if case.startswith(f))


def _golden_model(family: str, model: str) -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN / "models" / family / model / "model.safetensors"))


def _run_golden(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, dict, dict]:
    """(our output, our output fused as transformers 5 holds it, mergekit's golden)."""
    monkeypatch.chdir(GOLDEN)
    streammerge.merge(GOLDEN / "cases" / case / "config.yml", tmp_path / case, quiet=True)
    got = load_file(str(tmp_path / case / "model.safetensors"))
    gold = load_file(str(GOLDEN / "cases" / case / "golden" / "model.safetensors"))
    return got, fused_state_dict(arch_of(GOLDEN / "models" / _family(case) / "base"), got), gold


@pytest.mark.parametrize("case", CASES)
def test_matches_mergekit_on_moe(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our output, fused, is mergekit's: every element outside the experts, and every expert element
    but the pinned count (expect.json) where mergekit's per-tensor statistics span a layer's fused
    experts and ours one expert."""
    got, fused, gold = _run_golden(case, tmp_path, monkeypatch)
    assert got.keys() == _golden_model(_family(case), "base").keys()
    assert fused.keys() == gold.keys()
    experts = [n for n in gold if ".experts." in n]
    assert [n for n in gold if n not in experts and not _close(fused[n], gold[n].double())] == []
    differing = sum(int(((fused[n] - gold[n].double()).abs() > 1e-6).sum()) for n in experts)
    assert differing == json.loads((GOLDEN / "cases" / case / "expect.json").read_text())["expert_diffs"]


def test_ties_selects_per_expert_where_mergekit_selects_over_the_fused_layer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """mergekit 0.1.5 keeps the top half of |δ| over a layer's fused ``gate_up_proj`` (every expert's
    gate and up) and ``down_proj``; streammerge over each expert's tensor. Each side equals the TIES
    reference at its own granularity."""
    got, _, gold = _run_golden("mixtral_ties", tmp_path, monkeypatch)
    models = [_golden_model("mixtral", m) for m in ("base", "ft1", "ft2")]
    arch = arch_of(GOLDEN / "models" / "mixtral" / "base")

    def ties(tensors: list[dict[str, torch.Tensor]], name: str) -> torch.Tensor:
        return ref.task_family(tensors[0][name], [t[name] for t in tensors[1:]], [0.6, 0.3],
                               sparsify="magnitude", densities=[0.5, 0.7], consensus=True, normalize=True)

    assert [n for n in got if not _close(got[n], ties(models, n))] == []
    fused_inputs = [fused_state_dict(arch, t) for t in models]
    assert [n for n in gold if not _close(gold[n], ties(fused_inputs, n))] == []
