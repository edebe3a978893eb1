"""``streammerge linear``: the two-model command line, against a float64 reference computed here
(merged = α·A + (1 − α)·B) and against the native plan it stands for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file
from tokenizers import Tokenizer

from checkpoint_builder import Arch, random_tensors, write_checkpoint
from family_builder import layout, write_standin
from streammerge.cli import main
from streammerge.frontdoors.linear import model_name

ALPHA = 0.7
FORMULA = "(merged = alpha·A + (1 − alpha)·B)"
# files that must be byte-identical between equivalent merges
SAME_BYTES = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
              "tokenizer_config.json")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llama/{a,b} (separate q/k/v) and phi3/{a,b} (fused qkv_proj), 3 layers, float32, with
    tokenizers whose special tokens are <unk>, <s>, </s> and two added chat tokens."""
    root = tmp_path_factory.mktemp("linear")
    for family in ("llama", "phi3"):
        shapes, config = layout(family, 3)
        for k, name in enumerate(("a", "b")):
            write_standin(root / family / name, family, random_tensors(shapes, 10 + k), config, torch.float32)
    return root


def _linear(*args: object, quiet: bool = True) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["linear", *map(str, args), *(["-q"] if quiet else [])])
    return result.exit_code, result.output


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in load_file(str(path / "model.safetensors")).items()}


def _special_ids(model: Path) -> list[int]:
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    return sorted(tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"))


def _check(out: Path, a: Path, b: Path, merged: set[str], kept_rows: list[int]) -> None:
    """Tensors in ``merged`` are α·A + (1 − α)·B (float64 reference, float32 output) except the
    ``kept_rows`` of embeddings and lm_head, which are A's exactly; every other tensor is A's."""
    got, ta, tb = _tensors(out), _tensors(a), _tensors(b)
    assert got.keys() == ta.keys()
    for name, x in got.items():
        if name not in merged:
            assert torch.equal(x, ta[name]), name
            continue
        ref = ALPHA * ta[name] + (1 - ALPHA) * tb[name]
        rows = kept_rows if "embed_tokens" in name or "lm_head" in name else []
        if rows:
            assert torch.equal(x[rows], ta[name][rows]), name
            ref[rows] = ta[name][rows]
        torch.testing.assert_close(x, ref, rtol=1e-6, atol=1e-8, msg=name)  # float32 rounding
        assert not torch.equal(x, ta[name]), name


def test_full_merge_keeps_a_s_special_token_rows(models: Path, tmp_path: Path) -> None:
    a, b = models / "llama" / "a", models / "llama" / "b"
    code, output = _linear("--model-a", a, "--model-b", b, "--alpha", ALPHA, "--output-dir", tmp_path / "o")
    assert code == 0, output
    assert output.splitlines()[0] == ("architecture: llama (LlamaForCausalLM), 3 layers, separate q/k/v "
                                      "projections (q_proj, k_proj, v_proj)")
    special = _special_ids(a)
    assert special == [0, 1, 2, 62, 63]
    _check(tmp_path / "o", a, b, set(_tensors(a)), special)


def test_no_special_fixes_merges_every_row(models: Path, tmp_path: Path) -> None:
    a, b = models / "llama" / "a", models / "llama" / "b"
    code, output = _linear("--model_a", a, "--model_b", b, "--alpha", ALPHA, "--output_dir", tmp_path / "o",
                           "--no_special_fixes")
    assert code == 0, output
    _check(tmp_path / "o", a, b, set(_tensors(a)), [])


def test_selected_layers_merge_alone(models: Path, tmp_path: Path) -> None:
    a, b = models / "llama" / "a", models / "llama" / "b"
    code, output = _linear("--model-a", a, "--model-b", b, "--alpha", ALPHA, "--layers", 0, 2,
                           "--output-dir", tmp_path / "o")
    assert code == 0, output
    merged = {n for n in _tensors(a) if n.startswith(("model.layers.0.", "model.layers.2."))}
    _check(tmp_path / "o", a, b, merged, [])  # embeddings, norm, lm_head and layer 1 are A's
    # the statistics at the end: the output against A and B, printed and in merge_stats.json
    assert f"{tmp_path / 'o'} against {a}:" in output and f"{tmp_path / 'o'} against {b}:" in output
    against_a = json.loads((tmp_path / "o" / "merge_stats.json").read_text())["inputs"][str(a)]
    assert against_a["layers"]["1"]["l2_diff"] == 0 and against_a["layers"]["0"]["l2_diff"] > 0
    got, ta = _tensors(tmp_path / "o"), _tensors(a)
    name = "model.layers.0.mlp.down_proj.weight"
    want = float((got[name] - ta[name]).norm())
    assert against_a["tensors"][name]["l2_diff"] == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("family, projections",
                         [("llama", ("q_proj", "k_proj", "v_proj")), ("phi3", ("qkv_proj",))])
def test_qkv_only_merges_the_projections_of_the_layers(family: str, projections: tuple[str, ...],
                                                       models: Path, tmp_path: Path) -> None:
    a, b = models / family / "a", models / family / "b"
    code, output = _linear("--model-a", a, "--model-b", b, "--alpha", ALPHA, "--layers", 1, "--qkv-only",
                           "--output-dir", tmp_path / "o", quiet=False)
    assert code == 0, output
    merged = {f"model.layers.1.self_attn.{p}.weight" for p in projections}
    assert merged <= set(_tensors(a))
    _check(tmp_path / "o", a, b, merged, [])
    fused = family == "phi3"
    assert ("fused q/k/v projection (qkv_proj)" in output) == fused
    assert ("note: phi3 fuses q, k and v into one projection: --qkv-only merges qkv_proj" in output) == fused


def test_outputs_equal_the_native_plan_s(models: Path, tmp_path: Path) -> None:
    a, b = models / "phi3" / "a", models / "phi3" / "b"
    cases = {
        "full": ([], {"keep_tokens_from_base": "special"}),
        "layers": (["--layers", 2, 0], {"layers": [0, 2]}),
        "qkv": (["--layers", 1, "--qkv-only"], {"layers": [1], "modules": ["qkv"]}),
    }
    for name, (args, select) in cases.items():
        code, output = _linear("--model-a", a, "--model-b", b, "--alpha", ALPHA, *args,
                               "--output-dir", tmp_path / f"cli_{name}")
        assert code == 0, output
        plan = tmp_path / f"{name}.yaml"
        plan.write_text(yaml.safe_dump({
            "merge_method": "linear", "parameters": {"normalize": False}, "select": select,
            "models": [{"model": str(a), "parameters": {"weight": ALPHA}},
                       {"model": str(b), "parameters": {"weight": 1 - ALPHA}}]}))
        result = CliRunner().invoke(main, ["run", str(plan), str(tmp_path / f"plan_{name}"), "-q"])
        assert result.exit_code == 0, result.output
        for file in SAME_BYTES:
            cli, native = tmp_path / f"cli_{name}" / file, tmp_path / f"plan_{name}" / file
            assert cli.read_bytes() == native.read_bytes(), (name, file)


def test_default_output_directory(models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    a, b = models / "llama" / "a", models / "llama" / "b"
    assert _linear("--model-a", a, "--model-b", b, "--alpha", 0.7, "--layers", 2, 1, "--qkv-only")[0] == 0
    assert _linear("--model-a", a, "--model-b", b, "--alpha", 0.25)[0] == 0
    assert sorted(p.name for p in (tmp_path / "merged_models").iterdir()) == ["a_b_alpha0.25",
                                                                             "a_b_alpha0.70_layers1-2_qkv"]
    config = json.loads((tmp_path / "merged_models" / "a_b_alpha0.25" / "config.json").read_text())
    assert config["num_hidden_layers"] == 3
    assert model_name("acme/tiny-llama@v1") == "tiny-llama" and model_name(str(a) + "/") == "a"


def test_one_line_errors(models: Path, tmp_path: Path) -> None:
    a, b, phi = models / "llama" / "a", models / "llama" / "b", models / "phi3" / "b"
    wider = write_checkpoint(tmp_path / "wider", random_tensors(Arch(16, 64, 3, 64, 4, 1).shapes()),
                             Arch(16, 64, 3, 64, 4, 1).config(torch.float32))
    out = tmp_path / "o"
    cases = [  # (options replaced, options added, the one line)
        ({}, ["--layers", 1, 30], "error: model has 3 layers (0-2), got 30"),
        ({}, ["--layers", -1], "error: model has 3 layers (0-2), got -1"),
        ({"--alpha": 1.5}, [], f"error: --alpha 1.5: must be between 0 and 1 {FORMULA}"),
        ({"--alpha": -0.1}, [], f"error: --alpha -0.1: must be between 0 and 1 {FORMULA}"),
        ({}, ["--qkv-only"], "error: --qkv-only needs --layers: name the decoder layers whose q/k/v "
                             "projections to merge, e.g. --layers 1 2 20"),
        ({"--model-b": phi}, [], f"error: --model-a {a} is LlamaForCausalLM (llama), --model-b {phi} is "
                                 "Phi3ForCausalLM (phi3): linear merges two models of one architecture"),
        ({"--model-b": wider}, [], f"error: tensor 'model.layers.0.mlp.down_proj.weight' has shape "
                                   f"[16, 56] in {a} and [16, 64] in {wider}: the models' shapes differ"),
    ]
    for replaced, added, message in cases:
        given = {"--model-a": a, "--model-b": b, "--alpha": ALPHA} | replaced
        code, output = _linear(*[x for kv in given.items() for x in kv], *added, "--output-dir", out)
        assert (code, output) == (1, message + "\n"), message
        assert not out.exists()


def test_keep_tokens_from_base_in_chunks_and_by_token(models: Path, tmp_path: Path) -> None:
    """The native key the command line uses: the same bytes whatever the chunking (rows kept in the
    first and last of 7 chunks), tokens named one by one, and an unknown token refused."""
    a, b = models / "llama" / "a", models / "llama" / "b"

    def plan(keep: object, **extra: object) -> dict:
        return {"merge_method": "linear", "select": {"keep_tokens_from_base": keep}, **extra,
                "models": [{"model": str(a), "parameters": {"weight": ALPHA}},
                           {"model": str(b), "parameters": {"weight": 1 - ALPHA}}]}

    import streammerge
    from streammerge.errors import PlanError

    streammerge.merge(plan("special"), tmp_path / "whole", quiet=True)
    streammerge.merge(plan("special", chunk_size=16 * 10), tmp_path / "chunks", quiet=True)
    weights = [(tmp_path / d / "model.safetensors").read_bytes() for d in ("whole", "chunks")]
    assert weights[0] == weights[1]
    streammerge.merge(plan(["<s>", "<|im_end|>"], chunk_size=16 * 10), tmp_path / "two", quiet=True)
    none = {k: v for k, v in plan("special").items() if k != "select"}
    streammerge.merge(none, tmp_path / "none", quiet=True)
    got, merged, ta = _tensors(tmp_path / "two"), _tensors(tmp_path / "none"), _tensors(a)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        kept = torch.zeros(64, dtype=torch.bool)
        kept[[1, 63]] = True
        assert torch.equal(got[name][kept], ta[name][kept])
        assert torch.equal(got[name][~kept], merged[name][~kept])
        assert not torch.equal(merged[name][kept], ta[name][kept])
    unknown = r"select.keep_tokens_from_base: '<nope>' is not a token of .*/llama/a's tokenizer"
    with pytest.raises(PlanError, match=unknown):
        streammerge.merge(plan(["<nope>"]), tmp_path / "bad", quiet=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_special_rows_are_a_s_and_the_rest_as_on_the_cpu(models: Path, tmp_path: Path) -> None:
    a, b = models / "llama" / "a", models / "llama" / "b"
    for device in ("cpu", "cuda"):
        code, output = _linear("--model-a", a, "--model-b", b, "--alpha", ALPHA, "--device", device,
                               "--output-dir", tmp_path / device)
        assert code == 0, output
    cpu, cuda, ta = _tensors(tmp_path / "cpu"), _tensors(tmp_path / "cuda"), _tensors(a)
    special = _special_ids(a)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(cuda[name][special], ta[name][special])
    assert all(bool(((cuda[n] - cpu[n]).abs() <= 1e-6).all()) for n in cpu)


def test_keep_tokens_from_base_with_a_built_vocabulary_and_another_output_dtype(models: Path,
                                                                                tmp_path: Path) -> None:
    """With a tokenizer block the rows are the built vocabulary's ids (read through its row maps),
    and kept rows are A's rounded to out_dtype as a copied tensor is."""
    import streammerge

    a, b = models / "llama" / "a", models / "llama" / "b"
    plan = {"merge_method": "linear", "tokenizer": {"source": "union"}, "out_dtype": "bfloat16",
            "models": [{"model": str(a), "parameters": {"weight": ALPHA}},
                       {"model": str(b), "parameters": {"weight": 1 - ALPHA}}]}
    streammerge.merge(plan | {"select": {"keep_tokens_from_base": "special"}}, tmp_path / "kept", quiet=True)
    streammerge.merge(plan, tmp_path / "merged", quiet=True)
    kept, merged, ta = (load_file(str(d / "model.safetensors"))
                        for d in (tmp_path / "kept", tmp_path / "merged", a))
    special = torch.zeros(64, dtype=torch.bool)
    special[_special_ids(a)] = True
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert kept[name].dtype == torch.bfloat16
        assert torch.equal(kept[name][special], ta[name][special].to(torch.bfloat16))
        assert torch.equal(kept[name][~special], merged[name][~special])
        assert not torch.equal(merged[name][special], kept[name][special])
