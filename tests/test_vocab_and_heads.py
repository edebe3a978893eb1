"""Differing vocabulary sizes, tied and untied heads, and quantized inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

import references as ref
import streammerge
from checkpoint_builder import Arch, Family, base_tensors, fine_tunes, write_checkpoint
from conftest import load_output
from streammerge.cli import main
from streammerge.errors import CheckpointError, PlanError

ARCH = Arch()
VOCAB = ("lm_head.weight", "model.embed_tokens.weight")
GOLDEN = Path(__file__).parent / "data" / "vocab_truncate"  # mergekit 0.1.5 outputs (make.py there)


def _refusal(*sizes: tuple[str, list[tuple[int, Path]]]) -> str:
    """The refusal's text for these (tensor names, [(rows, model)]) groups, written out in full."""
    named = "; ".join(f"{names} {'have' if ' and ' in names else 'has'} {rows[0][0]} rows in {rows[0][1]}"
                      + "".join(f", {n} in {m}" for n, m in rows[1:]) for names, rows in sizes)
    return (f"vocabulary sizes differ: {named}, and no tokenizer block aligns them (truncating drops "
            "the extra rows, often added special tokens): add a tokenizer block (e.g. tokenizer: "
            "{source: base}), or opt in to truncation to the common rows as mergekit's "
            "--unsafe-truncate-embeddings does: vocab_policy: truncate in the plan, or "
            "--unsafe-truncate-embeddings on the command line")


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


def test_differing_vocabularies_are_refused_by_default(vocab_models, tmp_path: Path) -> None:
    """Truncation drops rows (often the added special tokens), so it is refused unless asked for."""
    base, ft1, ft2, _ = vocab_models
    with pytest.raises(PlanError) as e:
        streammerge.merge(_ta(ft2, [base, ft1]), tmp_path / "out", quiet=True)
    both = " and ".join(VOCAB)
    assert str(e.value) == _refusal((both, [(ARCH.vocab + 2, ft2), (ARCH.vocab, base), (ARCH.vocab, ft1)]))
    assert list(tmp_path.iterdir()) == []


def test_the_refusal_gives_each_tensor_its_own_sizes(vocab_models, tmp_path: Path) -> None:
    base, _, ft2, t = vocab_models
    longer_head = dict(t[ft2]) | {"lm_head.weight": torch.zeros(ARCH.vocab + 5, ARCH.hidden)}
    path = write_checkpoint(tmp_path / "head", longer_head, ARCH.config(torch.float32))
    with pytest.raises(PlanError) as e:
        streammerge.schedule(_ta(base, [path]))
    assert str(e.value) == _refusal((VOCAB[0], [(ARCH.vocab, base), (ARCH.vocab + 5, path)]),
                                    (VOCAB[1], [(ARCH.vocab, base), (ARCH.vocab + 2, path)]))


@pytest.mark.parametrize("command", ["run", "plan"])
def test_the_cli_refuses_unless_told_to_truncate(command: str, vocab_models, tmp_path: Path) -> None:
    base, ft1, ft2, _ = vocab_models
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump(_ta(ft2, [base, ft1])))
    out = tmp_path / "out"
    args = [command, str(plan)] + ([str(out), "-q"] if command == "run" else [])
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 1
    sizes = [(ARCH.vocab + 2, ft2), (ARCH.vocab, base), (ARCH.vocab, ft1)]
    assert refused.output.splitlines() == ["error: " + _refusal((" and ".join(VOCAB), sizes))]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.yaml"]
    allowed = CliRunner().invoke(main, args + ["--unsafe-truncate-embeddings"])
    assert allowed.exit_code == 0, allowed.output
    if command == "plan":
        assert f"{ARCH.vocab} rows kept (vocab_policy: truncate)" in allowed.output
        return
    streammerge.merge(_ta(ft2, [base, ft1], vocab_policy="truncate"), tmp_path / "api", quiet=True)
    got, want = load_output(out), load_output(tmp_path / "api")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert got["lm_head.weight"].shape == (ARCH.vocab, ARCH.hidden)


def test_truncate_keeps_the_common_rows_and_reports_it(vocab_models, tmp_path: Path) -> None:
    base, ft1, ft2, t = vocab_models
    plan = _ta(ft2, [base, ft1], vocab_policy="truncate")  # the larger model as base
    result = streammerge.merge(plan, tmp_path / "out", quiet=True)
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
    """As in mergekit, truncation applies to the vocabulary matrices only."""
    base, ft1, _, t = vocab_models
    bad = dict(t[ft1])
    bad["model.layers.0.mlp.up_proj.weight"] = torch.zeros(ARCH.intermediate + 1, ARCH.hidden)
    path = write_checkpoint(tmp_path / "bad", bad, ARCH.config(torch.float32))
    with pytest.raises(streammerge.StreamMergeError, match="model.layers.0.mlp.up_proj.weight"):
        streammerge.merge(_ta(base, [path], vocab_policy="truncate"), tmp_path / "out", quiet=True)


def _golden(case: str, tmp_path: Path, **overrides: str) -> tuple[dict, dict]:
    """streammerge's output for a case of tests/data/vocab_truncate, and mergekit's."""
    streammerge.merge(GOLDEN / "cases" / case / "config.yml", tmp_path / case, quiet=True, **overrides)
    gold = load_file(str(GOLDEN / "cases" / case / "golden" / "model.safetensors"))
    return load_output(tmp_path / case), gold


@pytest.mark.parametrize("case", ["linear", "ties"])
def test_truncate_gives_mergekits_truncated_output(case: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """mergekit 0.1.5 with --unsafe-truncate-embeddings, on a fine-tune with two added tokens."""
    monkeypatch.chdir(GOLDEN)
    config = GOLDEN / "cases" / case / "config.yml"
    with pytest.raises(PlanError, match="vocabulary sizes differ"):
        streammerge.schedule(config)
    got, gold = _golden(case, tmp_path, vocab_policy="truncate")
    assert got.keys() == gold.keys() and all(got[n].shape == gold[n].shape for n in gold)
    assert gold["lm_head.weight"].shape[0] == 120
    if case == "ties":
        assert all(torch.equal(got[n], gold[n]) for n in gold)
        return
    # linear sums in another order than mergekit (one ulp apart, as on the golden parity case);
    # its truncated output is bit for bit streammerge's merge of the inputs truncated beforehand
    assert max((got[n].double() - gold[n].double()).abs().max().item() for n in gold) < 1e-6
    grown = GOLDEN / "models" / "ft2_grown"
    tensors = {n: v[:120] if n in VOCAB else v
               for n, v in load_file(str(grown / "model.safetensors")).items()}

    cut = write_checkpoint(tmp_path / "cut", tensors, json.loads((grown / "config.json").read_text()))
    plan = yaml.safe_load(config.read_text())
    plan["models"][2]["model"] = str(cut)
    streammerge.merge(plan, tmp_path / "pre_cut", quiet=True)
    want = load_output(tmp_path / "pre_cut")
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_a_tokenizer_block_needs_no_opt_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tokenizer: {source: union} re-indexes the rows as mergekit does, keeping the added tokens' rows."""
    monkeypatch.chdir(GOLDEN)
    got, gold = _golden("ties_tokenizer_union", tmp_path)
    assert gold["lm_head.weight"].shape[0] == 122
    assert got.keys() == gold.keys() and all(torch.equal(got[n], gold[n]) for n in gold)


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
