"""extract-lora: mergekit-extract-lora's adapters, out of core and resumable.

Goldens (tests/data/extract_lora, from scripts/make_extract_lora_goldens.py) are mergekit 0.1.5's
adapters for tiny Llama, Mistral and Qwen2 stand-ins (tests/extract_lora_cases.py).
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import streammerge
from conftest import load_output
from extract_lora_cases import CASES, build, fingerprint
from streammerge.cli import main as cli
from streammerge.lora.extract import ExtractOptions, factor, factor_rows
from streammerge.lora.extract_command import main as extract_main
from streammerge.lora.extraction import extract_lora

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

GOLDEN = Path(__file__).parent / "data" / "extract_lora"
RECORD = json.loads((GOLDEN / "cases.json").read_text())
PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def standins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Per case, (base, ft) as the goldens were made from; the builders must still make them."""
    root = tmp_path_factory.mktemp("extract_lora")
    out = {}
    for case, (family, _) in CASES.items():
        base, ft = build(root / case, family)
        assert {"base": fingerprint(base), "ft": fingerprint(ft)} == RECORD[case]["inputs"], \
            f"{case}: the builders no longer make the golden's inputs; rerun scripts/make_extract_lora_goldens.py"
        out[case] = (base, ft)
    return out


@pytest.fixture(scope="module")
def extracted(standins: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per case, streammerge's adapter, made through `streammerge extract-lora` with the case's options."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for case, (base, ft) in standins.items():
        out[case] = root / case
        _run(cli, "extract-lora", "--model", ft, "--base-model", base, "--out-path", out[case], *CASES[case][1])
    return out


def _run(command, *args, code: int = 0) -> str:
    result = CliRunner().invoke(command, [str(a) for a in args])
    assert result.exit_code == code, result.output + repr(result.exception)
    return result.output


def _modules(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor, bool]]:
    """module -> (A, B, embedding) of an adapter's factors."""
    out = {}
    for key, a in tensors.items():
        for tag, b_tag, embedding in ((".lora_A.weight", ".lora_B.weight", False),
                                      (".lora_embedding_A", ".lora_embedding_B", True)):
            if key.endswith(tag):
                out[key[len(PREFIX):-len(tag)]] = (a, tensors[key.replace(tag, b_tag)], embedding)
    return out


def _delta(model: Path, base: Path, module: str) -> torch.Tensor:
    name = f"{module}.weight"
    return load_output(model)[name].double() - load_output(base)[name].double()


@pytest.mark.parametrize("case", CASES)
def test_factors_match_mergekit_up_to_the_sign_of_each_singular_pair(case: str, extracted: dict) -> None:
    mine = load_file(extracted[case] / "adapter_model.safetensors")
    gold = load_file(GOLDEN / case / "adapter_model.safetensors")
    assert set(mine) == set(gold)
    pairs = _modules(gold)
    assert pairs
    for module, (ga, gb, _) in pairs.items():
        ma, mb, _ = _modules(mine)[module]
        assert ma.shape == ga.shape and mb.shape == gb.shape, module
        sign = torch.sign((ma * ga).sum(dim=1))  # one per singular pair: row i of A, column i of B
        assert torch.all(sign != 0), module
        assert torch.allclose(ma, sign[:, None] * ga, atol=1e-5, rtol=1e-4), module
        assert torch.allclose(mb, gb * sign[None, :], atol=1e-5, rtol=1e-4), module
        assert (mb @ ma - gb @ ga).abs().max() <= 1e-5, module  # the reconstructions, in fp32
    for key in set(gold) - {k for m in pairs for k in gold if k.startswith(f"{PREFIX}{m}.lora_")}:
        assert torch.equal(mine[key], gold[key]), key  # modules saved whole
    for key in (k for k in gold if k.endswith(".lora_B.bias")):
        assert torch.allclose(mine[key], gold[key], atol=1e-7), key
    config = json.loads((extracted[case] / "adapter_config.json").read_text())
    want = json.loads((GOLDEN / case / "adapter_config.json").read_text())
    for key in ("peft_type", "use_rslora", "task_type", "r", "lora_alpha", "rank_pattern", "alpha_pattern",
                "lora_dropout", "fan_in_fan_out", "inference_mode"):
        assert config[key] == want[key], key
    assert sorted(config["modules_to_save"]) == sorted(want["modules_to_save"])
    # mergekit names each factored module by its last name component; where some module with that
    # name is not factored, streammerge lists the factored ones in full instead
    for target in config["target_modules"]:
        assert target in want["target_modules"] or target.rpartition(".")[2] in want["target_modules"]
    assert "lora_bias" not in config


def test_goldens_cover_what_the_issue_asks(extracted: dict) -> None:
    configs = {c: json.loads((GOLDEN / c / "adapter_config.json").read_text()) for c in CASES}
    tensors = {c: load_file(GOLDEN / c / "adapter_model.safetensors") for c in CASES}
    assert configs["qwen2_epsilon_filters"]["rank_pattern"]  # ranks differ under --sv-epsilon
    assert any(k.endswith(".lora_B.bias") for k in tensors["qwen2_epsilon_filters"])
    assert any("lora_embedding_A" in k for k in tensors["mistral_embed_no_distribute"])
    assert f"{PREFIX}model.embed_tokens.weight" in tensors["llama_default"]


@pytest.mark.parametrize("case", CASES)
def test_the_fold_back_is_ft_within_the_truncation_error(case: str, standins: dict, extracted: dict,
                                                         tmp_path: Path) -> None:
    base, ft = standins[case]
    adapter = extracted[case]
    streammerge.merge({"merge_method": "passthrough", "models": [{"model": f"{base}+{adapter}"}]},
                      tmp_path / "out", quiet=True)
    got, want, was = load_output(tmp_path / "out"), load_output(ft), load_output(base)
    factors = _modules(load_file(adapter / "adapter_model.safetensors"))
    saved = {k[len(PREFIX):] for k in load_file(adapter / "adapter_model.safetensors") if "lora_" not in k}
    for name in want:
        module = name.rpartition(".")[0]
        if module in factors:
            if name.endswith(".bias"):
                assert torch.allclose(got[name], want[name], atol=1e-6), name
                continue
            rank = factors[module][0].shape[0]
            s = torch.linalg.svdvals(want[name].double() - was[name].double())
            predicted = s[rank:].square().sum().sqrt().item()
            error = (got[name].double() - want[name].double()).norm().item()
            assert error <= predicted + 1e-5 * s[0].item() + 1e-6, name
            assert error >= 0.5 * predicted, name  # truncation did drop something
        elif name in saved:
            assert torch.equal(got[name], want[name]), name
        else:
            assert torch.equal(got[name], was[name]), name  # left out: the base's


@pytest.mark.parametrize("case", CASES)
def test_peft_loads_the_adapter_and_merges_it_as_streammerge_folds_it(case: str, standins: dict, extracted: dict,
                                                                      tmp_path: Path) -> None:
    base, _ = standins[case]
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(model, extracted[case])
    adapter = load_file(extracted[case] / "adapter_model.safetensors")
    loaded = with_adapter.state_dict()
    for key, factor in adapter.items():  # every factor found its layer
        if "lora_" in key and not key.endswith(".bias"):
            peft_key = key.replace(".weight", ".default.weight") if key.endswith(".weight") else f"{key}.default"
            assert torch.equal(loaded[peft_key], factor), key
    ids = torch.tensor([[1, 7, 3, 30, 12, 5]])
    with torch.no_grad():
        logits = with_adapter(ids).logits
    merged = {k: v.detach() for k, v in with_adapter.merge_and_unload().state_dict().items()}
    streammerge.merge({"merge_method": "passthrough", "models": [{"model": f"{base}+{extracted[case]}"}]},
                      tmp_path / "out", quiet=True)
    folded = load_output(tmp_path / "out")
    # PEFT adds lora_B.bias only under its lora_bias, which mergekit (and streammerge) leave unset
    tied = "lm_head.weight" not in folded
    for name, tensor in folded.items():
        if tied and name == "model.embed_tokens.weight" and f"{PREFIX}lm_head.lora_A.weight" in adapter:
            continue  # merge_and_unload adds the head's and the embedding's update to the one tied matrix
        if f"{PREFIX}{name[:-len('.bias')]}.lora_B.bias" not in adapter:
            assert torch.allclose(merged[name], tensor, atol=1e-6), name
        else:
            assert torch.equal(merged[name], load_output(base)[name]), name
    if "lora_B.bias" not in str(list(adapter)):  # the output head too (a tied one included)
        folded_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
        with torch.no_grad():
            assert torch.allclose(folded_model(ids).logits, logits, atol=1e-5)


def _llama(standins: dict) -> tuple[Path, Path]:
    return standins["llama_default"]


def _extract(standins: dict, out: Path, **options) -> tuple[dict[str, torch.Tensor], dict]:
    base, ft = _llama(standins)
    extract_lora(ft, base, out, ExtractOptions(**options), quiet=True)
    return load_file(out / "adapter_model.safetensors"), json.loads((out / "adapter_config.json").read_text())


def test_save_module_keeps_it_at_full_rank(standins: dict, tmp_path: Path) -> None:
    tensors, config = _extract(standins, tmp_path / "a", max_rank=4, save_modules=("q_proj",))
    base, ft = _llama(standins)
    assert torch.equal(tensors[f"{PREFIX}model.layers.1.self_attn.q_proj.weight"],
                       load_output(ft)["model.layers.1.self_attn.q_proj.weight"])
    assert not any("q_proj.lora" in k for k in tensors)
    assert "q_proj" in config["modules_to_save"] and "q_proj" not in config["target_modules"]


def test_include_and_exclude_regexes_choose_the_factored_modules(standins: dict, tmp_path: Path) -> None:
    tensors, config = _extract(standins, tmp_path / "a", max_rank=4, include=(r"mlp",), exclude=(r"layers\.0\.",))
    assert set(_modules(tensors)) == {f"model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    # embeddings go to modules_to_save unless excluded (as in mergekit); norms follow the regexes
    assert config["modules_to_save"] == ["embed_tokens", "lm_head"]
    assert sorted(config["target_modules"]) == sorted(_modules(tensors))  # full names: layer 0 is left out


def test_skip_undecomposable_leaves_norms_out(standins: dict, tmp_path: Path) -> None:
    tensors, config = _extract(standins, tmp_path / "a", max_rank=4, skip_undecomposable=True)
    assert not any("norm" in k for k in tensors)
    assert config["modules_to_save"] == ["embed_tokens", "lm_head"]
    kept, _ = _extract(standins, tmp_path / "b", max_rank=4)
    assert f"{PREFIX}model.layers.0.input_layernorm.weight" in kept and "input_layernorm" in _config(tmp_path / "b")


def _config(out: Path) -> list[str]:
    return json.loads((out / "adapter_config.json").read_text())["modules_to_save"]


def test_sv_epsilon_drops_small_singular_values_and_writes_the_rank_pattern(standins: dict, tmp_path: Path) -> None:
    base, ft = _llama(standins)
    epsilon = 0.004
    tensors, config = _extract(standins, tmp_path / "a", max_rank=16, sv_epsilon=epsilon)
    ranks = {m: a.shape[0] for m, (a, _, _) in _modules(tensors).items()}
    for module, rank in ranks.items():
        s = torch.linalg.svdvals(_delta(ft, base, module).float())
        assert rank == min(16, int((s > epsilon).sum())), module
    assert len(set(ranks.values())) > 1
    assert config["r"] == max(ranks.values())
    assert config["rank_pattern"] == {m: r for m, r in ranks.items() if r != config["r"]}
    assert config["alpha_pattern"] == config["rank_pattern"]


def test_embed_lora_factors_the_embeddings_transposed(standins: dict, tmp_path: Path) -> None:
    base, ft = _llama(standins)
    tensors, config = _extract(standins, tmp_path / "a", max_rank=4, embed_lora=True)
    a, b = tensors[f"{PREFIX}model.embed_tokens.lora_embedding_A"], tensors[f"{PREFIX}model.embed_tokens.lora_embedding_B"]
    vocab, dim = load_output(ft)["model.embed_tokens.weight"].shape
    assert a.shape == (4, vocab) and b.shape == (dim, 4)  # ΔW ≈ (B·A)ᵀ
    s = torch.linalg.svdvals(_delta(ft, base, "model.embed_tokens"))
    error = ((b.double() @ a.double()).T - _delta(ft, base, "model.embed_tokens")).norm()
    assert abs(error - s[4:].square().sum().sqrt()) < 1e-5
    assert f"{PREFIX}lm_head.lora_A.weight" in tensors
    assert {"embed_tokens", "lm_head"} <= set(config["target_modules"])
    assert not {"embed_tokens", "lm_head"} & set(config["modules_to_save"])


def test_distribute_scale_splits_the_singular_values_between_the_factors(standins: dict, tmp_path: Path) -> None:
    base, ft = _llama(standins)
    module = "model.layers.0.mlp.down_proj"
    s = torch.linalg.svdvals(_delta(ft, base, module).float())[:4]
    split, _ = _extract(standins, tmp_path / "a", max_rank=4)
    whole, _ = _extract(standins, tmp_path / "b", max_rank=4, distribute_scale=False)
    a, b, _ = _modules(split)[module]
    assert torch.allclose(a.norm(dim=1), s.sqrt(), rtol=1e-4) and torch.allclose(b.norm(dim=0), s.sqrt(), rtol=1e-4)
    a, b, _ = _modules(whole)[module]
    assert torch.allclose(a.norm(dim=1), s, rtol=1e-4) and torch.allclose(b.norm(dim=0), torch.ones(4), rtol=1e-4)


def test_a_shape_mismatch_is_one_line_naming_the_tensor(standins: dict, tmp_path: Path) -> None:
    base, ft = _llama(standins)
    other = tmp_path / "other"
    shutil.copytree(base, other)
    tensors = load_file(other / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:-1].contiguous()
    save_file(tensors, other / "model.safetensors")
    output = _run(extract_main, "--model", ft, "--base-model", other, "--out-path", tmp_path / "a", code=1)
    assert output.count("\n") == 1 and output.startswith("error: tensor 'model.layers.1.mlp.up_proj.weight'")
    assert not (tmp_path / "a").exists() and not (tmp_path / ".a.streammerge-partial").exists()


def test_a_missing_model_is_one_line(standins: dict, tmp_path: Path) -> None:
    base, _ = _llama(standins)
    output = _run(extract_main, "--model", tmp_path / "nope", "--base-model", base, "--out-path", tmp_path / "a", code=1)
    assert output.count("\n") == 1 and output.startswith(f"error: --model {tmp_path / 'nope'}: model directory not found")


def test_the_console_script_takes_mergekits_merge_options(standins: dict, tmp_path: Path) -> None:
    base, ft = _llama(standins)
    output = _run(extract_main, "--model", ft, "--base-model", base, "--out-path", tmp_path / "a", "--max-rank", "2",
                  "--lazy-unpickle", "--no-cuda", "--device", "cpu")
    assert "--lazy-unpickle: no effect" in output
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["r"] == 2
    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["streammerge-extract-lora"].partition(":")
    assert getattr(importlib.import_module(module), attr) is extract_main


_CHILD = """
import sys
sys.path.insert(0, {tests!r})
from crash_child import kill_after
import streammerge.lora.extraction as run
kill_after({target}, {method!r}, {n})
run.extract_lora({ft!r}, {base!r}, {out!r}, run.ExtractOptions(max_rank=4), quiet=True)
sys.exit(3)
"""


# after the 5th module's part; after the 15th file written whole: the adapter, before its config
@pytest.mark.parametrize("target,method,n,done", [("run", "_write_whole", 5, 5), ("run.ShardWriter", "close", 15, 14)],
                         ids=["parts", "assembled"])
def test_a_killed_extraction_resumes_to_the_same_bytes(target: str, method: str, n: int, done: int, standins: dict,
                                                       tmp_path: Path) -> None:
    base, ft = _llama(standins)
    extract_lora(ft, base, tmp_path / "whole", ExtractOptions(max_rank=4), quiet=True)
    out = tmp_path / "out"
    code = _CHILD.format(tests=str(Path(__file__).parent), target=target, method=method, n=n, ft=str(ft),
                         base=str(base), out=str(out))
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert child.returncode == -9, child.stderr
    assert not out.exists()
    result = extract_lora(ft, base, out, ExtractOptions(max_rank=4), quiet=True)
    assert result.resumed == done and f"resumed: {done} of 14 modules were already factored" in result.notes
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert not (tmp_path / ".out.streammerge-partial").exists()


def test_other_options_refuse_to_resume_and_restart_discards(standins: dict, tmp_path: Path) -> None:
    base, ft = _llama(standins)
    out = tmp_path / "out"
    code = _CHILD.format(tests=str(Path(__file__).parent), target="run", method="_write_whole", n=2, ft=str(ft),
                         base=str(base), out=str(out))
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == -9
    args = ["--model", ft, "--base-model", base, "--out-path", out, "--max-rank", "3"]
    output = _run(extract_main, *args, code=1)
    assert "holds a partial extraction with other inputs, options" in output and "--restart" in output
    _run(extract_main, *args, "--restart", "-q")
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 3



def test_bias_differences_are_written_as_mergekit_does_and_folded(standins: dict, tmp_path: Path) -> None:
    """Qwen2's q/k/v biases: their differences are lora_B.bias, as mergekit writes them (without
    PEFT's lora_bias, so PEFT ignores them), and streammerge's fold adds them."""
    base, ft = standins["qwen2_epsilon_filters"]
    result = extract_lora(ft, base, tmp_path / "a", ExtractOptions(max_rank=4), quiet=True)
    assert "lora_bias" not in json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert any("lora_B.bias" in note and "PEFT ignores them" in note for note in result.notes)
    streammerge.merge({"merge_method": "passthrough", "models": [{"model": f"{base}+{tmp_path / 'a'}"}]},
                      tmp_path / "out", quiet=True)
    got, want = load_output(tmp_path / "out"), load_output(ft)
    biases = [n for n in want if n.endswith("_proj.bias")]
    assert len(biases) == 6
    for name in biases:
        assert torch.allclose(got[name], want[name], atol=1e-6), name


@pytest.mark.parametrize("transpose", [False, True], ids=["linear", "embedding"])
@pytest.mark.parametrize("shape", [(300, 120), (120, 300)], ids=["tall", "wide"])
def test_the_lean_svd_gives_the_direct_factors_up_to_sign(shape: tuple[int, int], transpose: bool,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Large modules are factored from blocks of rows (a QR over blocks first); the factors are
    the same. Blocks of 7 rows or columns: fewer than the other side, so R grows block by block."""
    monkeypatch.setattr("streammerge.lora.extract.LEAN_BLOCK_BYTES", 4 * 7 * min(shape))
    g = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(shape[0], 20, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], 20, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -2, 20, dtype=torch.float64)  # well separated: each pair is determined
    delta = ((u * s) @ v.T).float() + 1e-5 * torch.randn(shape, generator=g)
    reads = []

    def read(start: int, stop: int) -> torch.Tensor:
        reads.append(stop - start)
        return delta[start:stop].clone()

    direct = factor(delta.T if transpose else delta, 8, 1e-6)
    lean = factor_rows(read, shape, 8, 1e-6, transpose=transpose, lean=True)
    assert max(reads) < shape[0] or shape[0] < shape[1]  # tall: never read whole
    sign = torch.sign((direct.a * lean.a).sum(dim=1))
    assert torch.allclose(lean.singular_values, direct.singular_values, atol=1e-6)
    assert torch.allclose(lean.a * sign[:, None], direct.a, atol=1e-5)
    assert torch.allclose(lean.b * sign[None, :], direct.b, atol=1e-5)
    assert abs(lean.truncation_error() - direct.truncation_error()) < 1e-6


@pytest.mark.parametrize("case", CASES)
def test_the_lean_svd_matches_mergekit_too(case: str, standins: dict, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("streammerge.lora.extract.LEAN_BYTES", 0)  # every module through the QR route,
    monkeypatch.setattr("streammerge.lora.extract.LEAN_BLOCK_BYTES", 300)  # in blocks of a few rows
    base, ft = standins[case]
    _run(cli, "extract-lora", "--model", ft, "--base-model", base, "--out-path", tmp_path / "a", *CASES[case][1])
    mine, gold = _modules(load_file(tmp_path / "a" / "adapter_model.safetensors")), \
        _modules(load_file(GOLDEN / case / "adapter_model.safetensors"))
    assert set(mine) == set(gold)
    for module, (ga, gb, _) in gold.items():
        ma, mb, _ = mine[module]
        assert (mb @ ma - gb @ ga).abs().max() <= 1e-5, module
        sign = torch.sign((ma * ga).sum(dim=1))
        assert torch.allclose(ma, sign[:, None] * ga, atol=1e-5, rtol=1e-4), module


def test_the_model_may_be_an_adapted_model(standins: dict, tmp_path: Path) -> None:
    """mergekit's MODEL+ADAPTER reference: extracting BASE+ADAPTER against BASE gives the adapter back."""
    base, ft = _llama(standins)
    extract_lora(ft, base, tmp_path / "a", ExtractOptions(max_rank=4, skip_undecomposable=True), quiet=True)
    again = extract_lora(f"{base}+{tmp_path / 'a'}", base, tmp_path / "b", ExtractOptions(max_rank=8), quiet=True)
    first = _modules(load_file(tmp_path / "a" / "adapter_model.safetensors"))
    second = _modules(load_file(tmp_path / "b" / "adapter_model.safetensors"))
    assert set(first) == set(second) and again.rank == 8
    for module, (a, b, _) in first.items():
        a2, b2, _ = second[module]
        assert (b2 @ a2 - b @ a).abs().max() < 1e-6, module  # rank 4 in, rank 4 out (the rest is rounding)


def test_modules_without_a_singular_value_above_epsilon_are_left_out(standins: dict, tmp_path: Path) -> None:
    base, ft = _llama(standins)
    same = tmp_path / "same_q"  # the fine-tune with layer 0's q_proj back at the base's values
    shutil.copytree(ft, same)
    tensors = load_file(same / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"] = load_output(base)["model.layers.0.self_attn.q_proj.weight"]
    save_file(tensors, same / "model.safetensors")
    result = extract_lora(same, base, tmp_path / "a", ExtractOptions(max_rank=4, sv_epsilon=1e-6), quiet=True)
    assert "model.layers.0.self_attn.q_proj" not in _modules(load_file(tmp_path / "a" / "adapter_model.safetensors"))
    assert any("1 module(s) left out" in note for note in result.notes)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert "model.layers.1.self_attn.q_proj" in config["target_modules"] and "q_proj" not in config["target_modules"]
    output = _run(extract_main, "--model", same, "--base-model", base, "--out-path", tmp_path / "b",
                  "--sv-epsilon", "10", "-q", code=1)
    assert output.count("\n") == 1 and "at most --sv-epsilon 10.0" in output
    assert not (tmp_path / ".b.streammerge-partial").exists()


def test_a_nonfinite_difference_is_one_line_naming_the_tensor(standins: dict, tmp_path: Path) -> None:
    base, ft = _llama(standins)
    bad = tmp_path / "nan_ft"
    shutil.copytree(ft, bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(tensors, bad / "model.safetensors")
    output = _run(extract_main, "--model", bad, "--base-model", base, "--out-path", tmp_path / "a", "-q", code=1)
    assert output.count("\n") == 1
    assert output.startswith("error: tensor 'model.layers.1.mlp.down_proj.weight' holds NaN or Inf")


def test_compute_dtype_auto_takes_the_difference_as_mergekit_does(tmp_path: Path) -> None:
    """bf16 inputs: mergekit subtracts in bf16; --compute-dtype float32 takes the exact difference."""
    base, ft = build(tmp_path / "bf16", "llama", torch.bfloat16)
    name, module = "model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.up_proj"
    w, w0 = load_output(ft)[name], load_output(base)[name]
    for dtype, delta in (("auto", (w - w0).float()), ("float32", w.float() - w0.float())):
        extract_lora(ft, base, tmp_path / dtype, ExtractOptions(max_rank=4, compute_dtype=dtype), quiet=True)
        a, b, _ = _modules(load_file(tmp_path / dtype / "adapter_model.safetensors"))[module]
        want = factor(delta, 4)
        assert a.dtype == torch.bfloat16
        sign = torch.sign((a.float() * want.a).sum(dim=1))
        assert torch.equal(a, (want.a * sign[:, None]).bfloat16()), dtype
        assert torch.equal(b, (want.b * sign[None, :]).bfloat16()), dtype
    assert not torch.equal(load_file(tmp_path / "auto" / "adapter_model.safetensors")[f"{PREFIX}{module}.lora_A.weight"],
                           load_file(tmp_path / "float32" / "adapter_model.safetensors")[f"{PREFIX}{module}.lora_A.weight"])
