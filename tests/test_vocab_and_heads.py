"""Differing vocabulary sizes, tied and untied heads, and quantized inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import references as ref
import streammerge
from checkpoint_builder import Arch, Family, base_tensors, fine_tunes, write_checkpoint
from conftest import load_output
from streammerge.errors import CheckpointError

ARCH = Arch()


def _grown(tensors: dict[str, torch.Tensor], extra: int) -> dict[str, torch.Tensor]:
    """Two added tokens (e.g. a pad token): embedding and head rows appended."""
    out = dict(tensors)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        out[name] = torch.cat([tensors[name], torch.full((extra, ARCH.hidden), 0.5, dtype=tensors[name].dtype)])
    return out


@pytest.fixture(scope="module")
def vocab_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, dict]:
    root = tmp_path_factory.mktemp("vocab")
    base = base_tensors(ARCH)
    ft1, ft2 = fine_tunes(base, 2)
    ft2 = _grown(ft2, 2)
    config = ARCH.config(torch.float32)
    paths = (write_checkpoint(root / "base", base, config), write_checkpoint(root / "ft1", ft1, config),
             write_checkpoint(root / "ft2", ft2, config | {"vocab_size": ARCH.vocab + 2}))
    return (*paths, {p: {k: v.float() for k, v in t.items()} for p, t in zip(paths, (base, ft1, ft2))})


def _ta(base: Path, models: list[Path], **extra) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(base),
            "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in models]} | extra


def test_truncate_keeps_the_common_rows_and_reports_it(vocab_models, tmp_path: Path) -> None:
    base, ft1, ft2, t = vocab_models
    result = streammerge.merge(_ta(ft2, [base, ft1]), tmp_path / "out", quiet=True)  # the larger model as base
    out = load_output(tmp_path / "out")
    assert out["model.embed_tokens.weight"].shape == (ARCH.vocab, ARCH.hidden)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == ARCH.vocab
    n = "lm_head.weight"
    want = ref.task_family(t[ft2][n][: ARCH.vocab], [t[base][n], t[ft1][n]], [0.5, 0.5])
    assert (out[n].double() - want).abs().max() < 1e-6
    assert any("vocabulary sizes differ" in note and "vocab_policy: truncate" in note for note in result.notes)


def test_base_policy_keeps_the_base_rows(vocab_models, tmp_path: Path) -> None:
    """Rows a model lacks count as unchanged from the base there."""
    base, ft1, ft2, t = vocab_models
    streammerge.merge(_ta(ft2, [base, ft1], vocab_policy="base"), tmp_path / "out", quiet=True)
    out = load_output(tmp_path / "out")
    n = "model.embed_tokens.weight"
    assert out[n].shape == (ARCH.vocab + 2, ARCH.hidden)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == ARCH.vocab + 2
    padded = [torch.cat([t[m][n], t[ft2][n][ARCH.vocab:]]) for m in (base, ft1)]
    want = ref.task_family(t[ft2][n], padded, [0.5, 0.5])
    assert (out[n].double() - want).abs().max() < 1e-6
    assert torch.equal(out[n][ARCH.vocab:], t[ft2][n][ARCH.vocab:])


def test_other_shape_mismatches_still_fail(vocab_models, tmp_path: Path) -> None:
    base, ft1, _, t = vocab_models
    bad = dict(t[ft1])
    bad["model.layers.0.mlp.up_proj.weight"] = torch.zeros(ARCH.intermediate + 1, ARCH.hidden)
    path = write_checkpoint(tmp_path / "bad", bad, ARCH.config(torch.float32))
    with pytest.raises(streammerge.StreamMergeError, match="model.layers.0.mlp.up_proj.weight"):
        streammerge.merge(_ta(base, [path]), tmp_path / "out", quiet=True)


def test_mixed_tied_and_untied_heads(fp32_family: Family, tmp_path: Path) -> None:
    """A tied fine-tune (no lm_head) lends its embeddings as its head; the output keeps one lm_head."""
    t = fp32_family.tensors
    tied = {k: v for k, v in t[fp32_family.models[0]].items() if k != "lm_head.weight"}
    tied_path = write_checkpoint(tmp_path / "tied", tied, ARCH.config(torch.float32) | {"tie_word_embeddings": True})
    plan = _ta(fp32_family.base, [tied_path, fp32_family.models[1]])
    result = streammerge.merge(plan, tmp_path / "out", quiet=True)
    out = load_output(tmp_path / "out")
    want = ref.task_family(t[fp32_family.base]["lm_head.weight"], [tied["model.embed_tokens.weight"], t[fp32_family.models[1]]["lm_head.weight"]], [0.5, 0.5])
    assert (out["lm_head.weight"].double() - want).abs().max() < 1e-6
    assert any("ties lm_head.weight to its embeddings" in n for n in result.notes)

    # A tied base with untied fine-tunes: the head is kept, and the config says untied.
    tied_base = {k: v for k, v in t[fp32_family.base].items() if k != "lm_head.weight"}
    base_path = write_checkpoint(tmp_path / "tied_base", tied_base, ARCH.config(torch.float32) | {"tie_word_embeddings": True})
    streammerge.merge(_ta(base_path, fp32_family.models[:2]), tmp_path / "out2", quiet=True)
    out2 = load_output(tmp_path / "out2")
    assert "lm_head.weight" in out2 and sorted(out2) == sorted(set(out2))
    assert json.loads((tmp_path / "out2" / "config.json").read_text())["tie_word_embeddings"] is False


def test_all_tied_inputs_give_a_tied_output(fp32_family: Family, tmp_path: Path) -> None:
    paths = []
    for i, p in enumerate([fp32_family.base, fp32_family.models[0]]):
        tensors = {k: v for k, v in fp32_family.tensors[p].items() if k != "lm_head.weight"}
        paths.append(write_checkpoint(tmp_path / f"m{i}", tensors, ARCH.config(torch.float32) | {"tie_word_embeddings": True}))
    streammerge.merge(_ta(paths[0], paths[1:]), tmp_path / "out", quiet=True)
    assert "lm_head.weight" not in load_output(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True


@pytest.mark.parametrize("kind", ["config", "tensor"])
def test_quantized_inputs_are_refused(kind: str, fp32_family: Family, tmp_path: Path) -> None:
    tensors = dict(fp32_family.tensors[fp32_family.models[0]])
    config = ARCH.config(torch.float32)
    if kind == "config":
        config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    else:
        tensors["model.layers.0.mlp.up_proj.qweight"] = torch.zeros(4, 4)
    path = write_checkpoint(tmp_path / "q", tensors, config)
    with pytest.raises(CheckpointError) as e:
        streammerge.merge(_ta(fp32_family.base, [path]), tmp_path / "out", quiet=True)
    assert str(path) in str(e.value) and "full-precision" in str(e.value)
    assert ("gptq" if kind == "config" else "qweight") in str(e.value)
