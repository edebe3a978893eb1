"""Chunk invariance, sharding and the Hugging Face layout of the output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import streammerge
from checkpoint_builder import Family
from conftest import load_output, merge_with_chunk_sizes

PLANS = {
    "ties": lambda f: {"merge_method": "ties", "base_model": str(f.base), "models": [
        {"model": str(m), "parameters": {"weight": w, "density": 0.35}} for m, w in zip(f.models, [0.6, 0.3, 0.5])]},
    "dare_ties": lambda f: {"merge_method": "dare_ties", "base_model": str(f.base), "seed": 1, "models": [
        {"model": str(m), "parameters": {"weight": w, "density": 0.5}} for m, w in zip(f.models, [0.6, 0.3, 0.5])]},
    "slerp": lambda f: {"merge_method": "slerp", "base_model": str(f.models[0]), "parameters": {"t": 0.3},
                        "models": [{"model": str(f.models[0])}, {"model": str(f.models[1])}]},
    "linear": lambda f: {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in f.models]},
}


def _shard_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.glob("*.safetensors"))}


@pytest.mark.parametrize("method", list(PLANS))
def test_chunk_size_does_not_change_a_byte(method: str, bf16_family: Family, tmp_path: Path) -> None:
    """Row chunks of 1 row, 7 rows and whole tensors (the embedding is 96 x 32) give the same shards."""
    outputs = merge_with_chunk_sizes(PLANS[method](bf16_family), tmp_path)
    assert outputs[0] == outputs[1] == outputs[2]


def test_chunk_size_does_not_change_ties_with_equal_magnitudes(tmp_path: Path) -> None:
    """Many |δ| equal at the k-th value: exactly k are kept, by flat index, whatever the chunking."""
    from checkpoint_builder import Arch, write_checkpoint

    arch = Arch(layers=1)
    base = {n: torch.zeros(s) for n, s in arch.shapes().items()}
    ft = {n: torch.sign(torch.randn(s, generator=torch.Generator().manual_seed(1))) * 0.5 for n, s in arch.shapes().items()}
    b = write_checkpoint(tmp_path / "b", base, arch.config(torch.float32))
    m = write_checkpoint(tmp_path / "m", ft, arch.config(torch.float32))
    plan = {"merge_method": "ties", "base_model": str(b), "models": [{"model": str(m), "parameters": {"weight": 1.0, "density": 0.3}}]}
    results = []
    for chunk in (32, 5 * 32, 10**9):
        streammerge.merge(plan, tmp_path / f"o{chunk}", quiet=True, chunk_size=chunk)
        results.append(load_output(tmp_path / f"o{chunk}"))
    for name, t in results[0].items():
        k = max(1, int(0.3 * t.numel()))
        kept = torch.nonzero(t.reshape(-1)).flatten()
        assert kept.tolist() == list(range(k)), name  # all |δ| equal: the first k by index
        assert torch.equal(t, results[1][name]) and torch.equal(t, results[2][name])


def test_small_shard_size_makes_a_valid_sharded_model(fp32_family: Family, tmp_path: Path) -> None:
    plan = PLANS["ties"](fp32_family)
    streammerge.merge(plan, tmp_path / "one", quiet=True)
    streammerge.merge(plan, tmp_path / "many", quiet=True, shard_size=20_000)
    out = tmp_path / "many"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n > 3 and shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert not (out / "model.safetensors").exists()
    names = list(fp32_family.tensors[fp32_family.base])
    assert sorted(index["weight_map"]) == sorted(names)
    seen = []
    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:
            for name in f.keys():
                assert index["weight_map"][name] == shard
                seen.append(name)
                f.get_tensor(name)
    assert sorted(seen) == sorted(names)  # every tensor exactly once
    total = sum(t.numel() * t.element_size() for t in load_output(out).values())
    assert index["metadata"]["total_size"] == total
    single = load_output(tmp_path / "one")
    assert all(torch.equal(single[k], v) for k, v in load_output(out).items())
    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:
            data = sum(f.get_tensor(k).nbytes for k in f.keys())
            assert data <= 20_000 or len(list(f.keys())) == 1, shard


def test_sharded_inputs_give_the_same_result(fp32_family: Family, sharded_family: Family, tmp_path: Path) -> None:
    streammerge.merge(PLANS["ties"](fp32_family), tmp_path / "a", quiet=True)
    streammerge.merge(PLANS["ties"](sharded_family), tmp_path / "b", quiet=True)
    a, b = load_output(tmp_path / "a"), load_output(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_output_directory_layout(fp32_family: Family, tmp_path: Path) -> None:
    plan = PLANS["ties"](fp32_family) | {"out_dtype": "bfloat16"}
    out = tmp_path / "merged"
    streammerge.merge(plan, out, quiet=True)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "generation_config.json",
                                                 "merge_config.json", "model.safetensors",
                                                 "streammerge-manifest.json", "streammerge_plan.yaml",
                                                 "tokenizer_config.json"]
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["num_hidden_layers"] == 3
    assert json.loads((out / "tokenizer_config.json").read_text())["marker"] == "base"  # copied from the base
    assert all(t.dtype == torch.bfloat16 for t in load_output(out).values())
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and f"streammerge {streammerge.__version__}" in card
    assert "merge_method: ties" in card and str(fp32_family.models[2]) in card and "density: 0.35" in card
    assert not list(tmp_path.glob(".*partial*"))  # the staging directory is gone


def test_tokenizer_source_names_the_donor(fp32_family: Family, tmp_path: Path) -> None:
    plan = PLANS["ties"](fp32_family) | {"tokenizer_source": str(fp32_family.models[1])}
    streammerge.merge(plan, tmp_path / "o", quiet=True)
    assert json.loads((tmp_path / "o" / "tokenizer_config.json").read_text())["marker"] == "ft2"


def test_bin_checkpoints_are_read(fp32_family: Family, tmp_path: Path) -> None:
    """A PyTorch .bin copy of a fine-tune merges to the same bytes as its safetensors original."""
    import shutil

    binary = tmp_path / "ft1_bin"
    binary.mkdir()
    shutil.copy(fp32_family.models[0] / "config.json", binary)
    torch.save(fp32_family.tensors[fp32_family.models[0]], binary / "pytorch_model.bin")
    plan = PLANS["ties"](fp32_family)
    streammerge.merge(plan, tmp_path / "a", quiet=True)
    plan["models"][0]["model"] = str(binary)
    streammerge.merge(plan, tmp_path / "b", quiet=True)
    assert _shard_bytes(tmp_path / "a") == _shard_bytes(tmp_path / "b")
