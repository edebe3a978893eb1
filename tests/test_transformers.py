"""The merged output is a model transformers loads, with the logits of the reference merge."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import references as ref
import streammerge
from checkpoint_builder import Family

transformers = pytest.importorskip("transformers")


def test_merged_model_loads_and_gives_reference_logits(sharded_family: Family, tmp_path: Path) -> None:
    ws, ds = [0.7, 0.2, 0.5], [0.5, 0.4, 0.6]
    plan = {"merge_method": "ties", "base_model": str(sharded_family.base),
            "models": [{"model": str(m), "parameters": {"weight": w, "density": d}} for m, w, d in zip(sharded_family.models, ws, ds)]}
    streammerge.merge(plan, tmp_path / "out", quiet=True, shard_size="40KB")
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()

    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    t = sharded_family.tensors
    state = {name: ref.task_family(t[sharded_family.base][name], [t[m][name] for m in sharded_family.models], ws,
                                   sparsify="magnitude", densities=ds, consensus=True, normalize=True).float()
             for name in t[sharded_family.base]}
    config = transformers.AutoConfig.from_pretrained(sharded_family.base)
    reference = transformers.LlamaForCausalLM(config).eval()
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)

    ids = torch.randint(3, sharded_family.arch.vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = merged(ids).logits, reference(ids).logits
    assert got.shape == (2, 12, sharded_family.arch.vocab)
    assert (got - want).abs().max().item() < 1e-5
