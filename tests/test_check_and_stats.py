"""``streammerge check`` (compatibility from headers alone) and ``streammerge stats`` (how far two
models are apart, read in row chunks), and ``run --stats``; figures against float64 references
computed here from whole tensors."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from checkpoint_builder import Family, write_checkpoint
from conftest import load_output
from streammerge.cli import main
from streammerge.errors import OutputError
from streammerge.inspect.stats import compare_models, layer_group, module_kind, output_statistics
from streammerge.io.reader import BinReader, ShardReader

TOL = 1e-12
LAYERS = ["pre", "0", "1", "2", "post"]


def _invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def _close(got: float, want: float) -> bool:
    return math.isclose(got, want, rel_tol=TOL, abs_tol=0.0)


def _reference(a: torch.Tensor, b: torch.Tensor, base: torch.Tensor | None) -> dict[str, float]:
    """The figures of the concatenated tensors, computed at once in float64."""
    a, b = a.double().flatten(), b.double().flatten()
    na, nb = torch.linalg.vector_norm(a).item(), torch.linalg.vector_norm(b).item()
    out = {"l2_diff": torch.linalg.vector_norm(a - b).item(), "norm_a": na, "norm_b": nb,
           "cosine": (torch.dot(a, b) / (na * nb)).item(), "elements": a.numel()}
    out["rel_change"] = out["l2_diff"] / na
    if base is not None:
        ta, tb = a - base.double().flatten(), b - base.double().flatten()
        norms = torch.linalg.vector_norm(ta) * torch.linalg.vector_norm(tb)
        out["task_cosine"] = (torch.dot(ta, tb) / norms).item()
        # zero in either task vector is no disagreement
        out["sign_disagreement"] = (((ta > 0) & (tb < 0)) | ((ta < 0) & (tb > 0))).double().mean().item()
    return out


def _assert_figures(got: dict, want: dict[str, float]) -> None:
    assert set(want) <= set(got)
    for key, value in want.items():
        assert _close(got[key], value), (key, got[key], value)


def _cat(tensors: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([tensors[n].double().flatten() for n in names])


@pytest.mark.parametrize("chunk", [1, 7 * 32, 10**9])
def test_stats_against_float64_reference(fp32_family: Family, chunk: int) -> None:
    """Per tensor, per layer, per module kind and overall, with any chunk size (1 element: a row
    at a time; 10**9: whole tensors)."""
    a_path, b_path = fp32_family.models[:2]
    a, b, base = (fp32_family.tensors[p] for p in (a_path, b_path, fp32_family.base))
    assert any(bool(((a[n] == base[n]) & (b[n] != base[n])).any()) for n in a)  # zeros in play
    result = compare_models(a_path, b_path, fp32_family.base, chunk_elements=chunk).as_dict()
    assert result["skipped"] == {} and sorted(result["tensors"]) == sorted(a)
    for name, figures in result["tensors"].items():
        _assert_figures(figures, _reference(a[name], b[name], base[name]))
    assert list(result["layers"]) == LAYERS
    for layer, figures in result["layers"].items():
        names = [n for n in a if layer_group(n) == layer]
        assert figures["tensors"] == len(names)
        _assert_figures(figures, _reference(_cat(a, names), _cat(b, names), _cat(base, names)))
    q = [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(3)]
    assert result["modules"]["self_attn.q_proj"]["tensors"] == 3
    _assert_figures(result["modules"]["self_attn.q_proj"], _reference(_cat(a, q), _cat(b, q), _cat(base, q)))
    every = list(a)
    _assert_figures(result["model"], _reference(_cat(a, every), _cat(b, every), _cat(base, every)))


def test_module_kinds_and_layers_from_names() -> None:
    assert module_kind("model.layers.3.self_attn.q_proj.weight") == "self_attn.q_proj"
    assert module_kind("model.layers.3.self_attn.q_proj.bias") == "self_attn.q_proj.bias"
    assert module_kind("model.layers.12.mlp.down_proj.weight") == "mlp.down_proj"
    expert = "model.layers.0.block_sparse_moe.experts.7.w1.weight"
    assert module_kind(expert) == "block_sparse_moe.experts.*.w1"
    assert module_kind("transformer.h.4.attn.c_attn.weight") == "attn.c_attn"
    assert module_kind("model.embed_tokens.weight") == "model.embed_tokens"
    assert module_kind("lm_head.weight") == "lm_head"
    assert [layer_group(n) for n in ("model.embed_tokens.weight", "model.layers.10.mlp.up_proj.weight",
                                     "model.norm.weight", "lm_head.weight")] == ["pre", "10", "post", "post"]


def test_stats_without_base_skips_and_zero_norms(fp32_family: Family, tmp_path: Path) -> None:
    """Tensors missing or of another shape are listed, not compared; a zero tensor has no cosine."""
    a = dict(fp32_family.tensors[fp32_family.models[0]])
    b = dict(fp32_family.tensors[fp32_family.models[1]])
    del b["model.norm.weight"]
    b["model.layers.1.mlp.up_proj.weight"] = torch.zeros(65, 32)
    a["model.layers.2.input_layernorm.weight"] = torch.zeros(32)
    config = fp32_family.arch.config(torch.float32)
    result = compare_models(write_checkpoint(tmp_path / "a", a, config),
                            write_checkpoint(tmp_path / "b", b, config), chunk_elements=100).as_dict()
    assert result["skipped"] == {"model.norm.weight": "not in b",
                                 "model.layers.1.mlp.up_proj.weight":
                                     "shapes differ: [64, 32] in a, [65, 32] in b"}
    zero = result["tensors"]["model.layers.2.input_layernorm.weight"]
    assert zero["cosine"] is None and zero["rel_change"] is None and zero["norm_a"] == 0.0
    norm_b = torch.linalg.vector_norm(b["model.layers.2.input_layernorm.weight"].double()).item()
    assert _close(zero["l2_diff"], norm_b)
    assert "task_cosine" not in zero and "sign_disagreement" not in result["model"]
    assert result["base"] is None and len(result["tensors"]) == 28


def test_stats_reads_a_tied_head_as_the_embeddings(fp32_family: Family, tmp_path: Path) -> None:
    """As a merge reads it: B ties its head, so A's head is compared with B's embeddings."""
    a = fp32_family.tensors[fp32_family.models[0]]
    b = {k: v for k, v in fp32_family.tensors[fp32_family.models[1]].items() if k != "lm_head.weight"}
    config = fp32_family.arch.config(torch.float32) | {"tie_word_embeddings": True}
    tied = write_checkpoint(tmp_path / "tied", b, config)
    result = compare_models(fp32_family.models[0], tied, chunk_elements=100).as_dict()
    assert result["skipped"] == {}
    assert result["tied"] == {"lm_head.weight": "b's model.embed_tokens.weight (tied)"}
    _assert_figures(result["tensors"]["lm_head.weight"],
                    _reference(a["lm_head.weight"], b["model.embed_tokens.weight"], None))
    out = _invoke("stats", fp32_family.models[0], tied, "-q")
    assert out.exit_code == 0
    assert out.stderr == "note: lm_head.weight: read as b's model.embed_tokens.weight (tied)\n"


def test_stats_command_json_table_and_png(fp32_family: Family, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    a, b = fp32_family.models[:2]
    out = _invoke("stats", a, b, "--base", fp32_family.base, "--json", tmp_path / "s.json",
                  "--png", tmp_path / "s.png", "--chunk-size", 64, "-q")
    assert out.exit_code == 0, out.output
    written = json.loads((tmp_path / "s.json").read_text())
    direct = compare_models(a, b, fp32_family.base, chunk_elements=64).as_dict()
    assert written == json.loads(json.dumps(direct))
    assert set(written) == {"a", "b", "base", "tensors", "layers", "modules", "model", "skipped", "tied"}
    assert set(written["tensors"]["lm_head.weight"]) == {"l2_diff", "rel_change", "cosine", "task_cosine",
                                                         "sign_disagreement", "norm_a", "norm_b", "elements",
                                                         "layer", "module"}
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["layer", "tensors", "l2_diff", "rel_change", "cosine", "task_cosine",
                                "sign_disagreement"]
    q = written["modules"]["self_attn.q_proj"]
    row = next(line.split() for line in lines if line.startswith("self_attn.q_proj "))
    assert row == ["self_attn.q_proj", "3", *(f"{q[k]:.6g}" for k in ("l2_diff", "rel_change", "cosine",
                                                                       "task_cosine", "sign_disagreement"))]
    assert [line.split()[0] for line in lines[1:6]] == LAYERS


def test_stats_png_without_matplotlib_stops_first(fp32_family: Family, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
    out = _invoke("stats", *fp32_family.models[:2], "--json", tmp_path / "s.json",
                  "--png", tmp_path / "s.png")
    assert out.exit_code == 1
    assert out.stderr == (f"error: --png {tmp_path / 's.png'} needs matplotlib: "
                          "pip install 'streammerge[plot]'\n")
    assert not (tmp_path / "s.json").exists()  # refused before any statistics


def test_run_stats_writes_the_output_against_each_input(fp32_family: Family, tmp_path: Path) -> None:
    m1, m2 = fp32_family.models[:2]
    plan = {"merge_method": "linear", "dtype": "float32",
            "models": [{"model": str(m1), "parameters": {"weight": 0.3}},
                       {"model": str(m2), "parameters": {"weight": 0.7}}]}
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    out = _invoke("run", tmp_path / "plan.yaml", tmp_path / "out", "--stats", "-q")
    assert out.exit_code == 0, out.output
    merged = load_output(tmp_path / "out")
    written = json.loads((tmp_path / "out" / "merge_stats.json").read_text())
    assert written["output"] == str(tmp_path / "out")
    assert list(written["inputs"]) == [str(m1.resolve()), str(m2.resolve())]
    for model in (m1, m2):
        stats = written["inputs"][str(model.resolve())]
        assert stats["a"] == str(model.resolve()) and stats["b"] == str(tmp_path / "out")
        assert stats["skipped"] == {} and list(stats["layers"]) == LAYERS
        for name, figures in stats["tensors"].items():
            _assert_figures(figures, _reference(fp32_family.tensors[model][name], merged[name], None))


def test_check_compatible_models(fp32_family: Family) -> None:
    out = _invoke("check", fp32_family.base, *fp32_family.models)
    assert out.exit_code == 0, out.output
    lines = out.stdout.splitlines()
    assert lines[0].split() == [str(p) for p in (fp32_family.base, *fp32_family.models)]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:] if line}
    assert rows["architecture"] == ["LlamaForCausalLM"] * 4 + ["ok"]
    assert rows["tensors"] == ["30"] * 4 + ["ok"]
    assert rows["shapes"] == ["34,016", "parameters"] * 4 + ["ok"]
    assert rows["dtypes"] == ["float32"] * 4 + ["ok"]
    assert rows["quantization"] == ["none"] * 4 + ["ok"]
    assert lines[-1] == "verdict: mergeable"


def _variant(family: Family, tmp_path: Path, kind: str) -> Path:
    """A copy of the first fine-tune that differs from the base in one way."""
    tensors = dict(family.tensors[family.models[0]])
    config = family.arch.config(torch.float32)
    dtype = torch.float32
    if kind == "shape":
        tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(65, 32)
    elif kind == "names":
        del tensors["model.norm.weight"]
    elif kind == "dtype":
        dtype = torch.bfloat16
    elif kind == "vocab":
        tensors |= {"model.embed_tokens.weight": torch.zeros(100, 32), "lm_head.weight": torch.zeros(100, 32)}
        config["vocab_size"] = 100
    elif kind == "tied":
        del tensors["lm_head.weight"]
        config["tie_word_embeddings"] = True
    elif kind == "quantized":
        config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    elif kind == "quantized_tensor":
        tensors["model.layers.0.mlp.up_proj.qweight"] = torch.zeros(4, 4)
    elif kind == "architecture":
        config |= {"architectures": ["MistralForCausalLM"], "model_type": "mistral"}
    elif kind == "alias":  # mergekit's one definition for both spellings
        config["architectures"] = ["LLaMaForCausalLM"]
    return write_checkpoint(tmp_path / kind, tensors, config, dtype=dtype)


CASES = {  # kind: (exit status, the row that differs: name, the base's value, the variant's, grade)
    "shape": (1, "shape model.layers.0.mlp.up_proj.weight", "[64, 32]", "[65, 32]", "error"),
    "names": (1, "model.norm.weight", "present", "missing", "error"),
    "dtype": (0, "dtypes", "float32", "bfloat16", "note"),
    "vocab": (0, "vocab_size", "96 (96 rows)", "100 (100 rows)", "needs"),
    "tied": (0, "tied embeddings", "untied", "tied", "note"),
    "quantized": (1, "quantization", "none", "gptq", "error"),
    "quantized_tensor": (1, "quantization", "none", "quantized tensors", "error"),
    "architecture": (1, "architecture", "LlamaForCausalLM", "MistralForCausalLM", "error"),
    "alias": (0, "architecture", "LlamaForCausalLM", "LLaMaForCausalLM", "note"),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_check_finds_each_difference(fp32_family: Family, tmp_path: Path, kind: str) -> None:
    variant = _variant(fp32_family, tmp_path, kind)
    out = _invoke("check", fp32_family.base, variant)
    status, what, ours, theirs, grade = CASES[kind]
    assert out.exit_code == status, out.output
    lines = out.stdout.splitlines()
    row = next(line for line in lines if line.startswith(what + "  "))
    assert re.split(r"\s{2,}", row) == [what, ours, theirs, grade]
    not_ok = [line.split()[0] for line in lines[1:] if line.endswith(("note", "needs", "error"))]
    # a tensor's difference is its property's row and its own; quantization state is an extra tensor too
    assert len(not_ok) == {"shape": 2, "names": 2, "quantized_tensor": 3}.get(kind, 1), not_ok
    verdict = lines[-1]
    if status:
        assert verdict.startswith("verdict: not mergeable: ")
    else:
        assert verdict == ("verdict: mergeable with a plan setting: embedding rows differ: add a tokenizer "
                           "block (e.g. tokenizer: {source: union}) or vocab_policy: truncate to the plan"
                           if grade == "needs" else "verdict: mergeable")
    if kind == "architecture":
        assert "allow_crimes: true" in verdict
    if kind == "quantized":
        assert f"{variant}: quantized checkpoint (gptq" in verdict


def test_check_reads_no_weights(fp32_family: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every kind of difference is found with tensor reads made to fail."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("check read tensor data")

    variants = [_variant(fp32_family, tmp_path, kind) for kind in CASES]
    for cls in (ShardReader, BinReader):
        monkeypatch.setattr(cls, "read", refuse)
        monkeypatch.setattr(cls, "prefetch", refuse)
    out = _invoke("check", fp32_family.base, *variants)
    assert out.exit_code == 1, out.output
    assert out.stdout.splitlines()[-1].startswith("verdict: not mergeable: ")
    rows = [line.split()[0] for line in out.stdout.splitlines()[1:] if line.endswith("error")]
    assert {"architecture", "tensors", "shapes", "quantization"} <= set(rows)


def test_check_errors(fp32_family: Family, tmp_path: Path) -> None:
    one = _invoke("check", fp32_family.base)
    assert one.exit_code == 1 and one.stderr == "error: check compares models: got 1, give two or more\n"
    missing = _invoke("check", fp32_family.base, tmp_path / "nope")
    nope = tmp_path / "nope"
    assert missing.exit_code == 1
    assert missing.stderr.startswith(f"error: {nope}: model: model directory '{nope}' not found")
    assert missing.stderr.count("\n") == 1


def test_run_stats_refuses_an_adapter_output(fp32_family: Family, tmp_path: Path) -> None:
    plan = {"merge_method": "task_arithmetic", "base_model": str(fp32_family.base),
            "adapter_output": {"combination": "cat"},
            "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in fp32_family.models[:2]]}
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    out = _invoke("run", tmp_path / "plan.yaml", tmp_path / "out", "--stats", "-q")
    assert out.exit_code == 1
    assert out.stderr == (f"error: {tmp_path / 'plan.yaml'}: --stats compares a merged model with its "
                          "inputs, "
                          "but adapter_output writes an adapter; drop --stats or adapter_output\n")
    assert not (tmp_path / "out").exists()
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(OutputError) as e:
        output_statistics(adapter, [str(fp32_family.base)])
    assert str(e.value) == (f"{adapter}: holds an adapter (adapter_output), not a model: statistics compare "
                            "merged models with their inputs")
