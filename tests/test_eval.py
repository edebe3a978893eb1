"""`streammerge eval` and `evaluate` against whole-model transformers runs of every architecture.

The references (tests/arch_builder.py) load each tiny checkpoint the usual way and score the
same windows; the layer stream must give the same mean NLL (fp32, 1e-5 relative) and the same
greedy tokens, with and without activation spilling, and with a LoRA adapter folded on the fly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from arch_builder import (FAMILIES, build_model, folded_model, reference_generate, reference_nll, sample_text,
                          write_adapter)
from conftest import hub_cache
from streammerge import evaluate
from streammerge.cli import main
from streammerge.evaluation.evaluate import load_tokenizer
from streammerge.evaluation.windows import Protocol, cut_windows, tokenize

SEQLEN = 32
PROMPTS = ["the river of stone", "a man", "water and light came over the house"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("archs")


@pytest.fixture(scope="module")
def text() -> str:
    return sample_text(500)


def _model(root: Path, family: str) -> Path:
    return root / family if (root / family).is_dir() else build_model(root, family)


def _reference_windows(model_dir: Path, text: str, protocol: Protocol) -> list[tuple[torch.Tensor, int]]:
    ids = tokenize(load_tokenizer(model_dir), [text], protocol.join)
    return [(w.ids, w.score_from) for w in cut_windows(ids, protocol)]


@pytest.mark.parametrize("family", FAMILIES)
def test_nll_and_generation_match_the_whole_model(models: Path, text: str, family: str) -> None:
    model = _model(models, family)
    total, count = reference_nll(model, _reference_windows(model, text, Protocol(seqlen=SEQLEN)))
    # 64-token batches: two windows a batch, so several batches share the recorded layer calls
    result = evaluate(model, [text], seqlen=SEQLEN, prompts=PROMPTS, max_new_tokens=6, batch_tokens=64)
    assert result.tokens == count and result.windows == count // (SEQLEN - 1)
    assert result.nll == pytest.approx(total / count, rel=1e-5)
    assert result.perplexity == pytest.approx(torch.tensor(total / count).exp().item(), rel=1e-5)
    assert [g.tokens for g in result.generations] == reference_generate(model, PROMPTS, 6)


def test_spilled_activations_give_the_same_numbers(models: Path, text: str) -> None:
    model = _model(models, "llama")
    kept = evaluate(model, [text], seqlen=SEQLEN, batch_tokens=64)
    spilled = evaluate(model, [text], seqlen=SEQLEN, batch_tokens=64, activation_budget=0,
                       prompts=PROMPTS, max_new_tokens=6)
    some = evaluate(model, [text], seqlen=SEQLEN, batch_tokens=64, activation_budget=3 * 64 * 32 * 4)
    assert kept.spilled_bytes == 0
    assert spilled.spilled_bytes > some.spilled_bytes > 0  # all batches, then all but three
    assert spilled.nll == kept.nll == some.nll  # the same arithmetic, whatever holds the activations
    assert [g.tokens for g in spilled.generations] == reference_generate(model, PROMPTS, 6)


def test_adapter_equals_the_folded_model(models: Path, text: str, tmp_path: Path) -> None:
    model = _model(models, "llama")
    adapter = write_adapter(tmp_path, model, seed=3)
    folded = folded_model(tmp_path, model, adapter)
    on_the_fly = evaluate(f"{model}+{adapter}", [text], seqlen=SEQLEN, prompts=PROMPTS, max_new_tokens=6)
    total, count = reference_nll(folded, _reference_windows(folded, text, Protocol(seqlen=SEQLEN)))
    assert on_the_fly.nll == pytest.approx(total / count, rel=1e-5)
    assert on_the_fly.nll != pytest.approx(evaluate(model, [text], seqlen=SEQLEN).nll, rel=1e-3)
    assert [g.tokens for g in on_the_fly.generations] == reference_generate(folded, PROMPTS, 6)


def test_sliding_window_protocol_matches(models: Path, text: str) -> None:
    model = _model(models, "qwen3")
    protocol = Protocol(seqlen=SEQLEN, stride=12)
    windows = _reference_windows(model, text, protocol)
    assert len({len(ids) for ids, _ in windows}) > 1  # a shorter last window: batches of two lengths
    total, count = reference_nll(model, windows)
    result = evaluate(model, [text], seqlen=SEQLEN, stride=12)
    assert (result.tokens, result.nll) == (count, pytest.approx(total / count, rel=1e-5))
    assert result.protocol["name"] == "sliding-window" and result.protocol["stride"] == 12


def test_cli_prints_the_scores_and_writes_json(models: Path, text: str, tmp_path: Path) -> None:
    model = _model(models, "gpt2")
    data = tmp_path / "text.txt"
    data.write_text(text)
    out = tmp_path / "eval.json"
    run = CliRunner().invoke(main, ["eval", str(model), "--data", str(data), "--seqlen", str(SEQLEN),
                                    "--samples", "5", "--prompt", PROMPTS[0], "--max-new-tokens", "4",
                                    "--json", str(out), "-q"])
    assert run.exit_code == 0, run.output
    report = json.loads(out.read_text())
    expected = evaluate(model, data, seqlen=SEQLEN, samples=5, prompts=PROMPTS[:1], max_new_tokens=4)
    assert {k: report[k] for k in ("perplexity", "nll", "tokens", "windows", "seqlen")} == {
        "perplexity": expected.perplexity, "nll": expected.nll, "tokens": 5 * (SEQLEN - 1), "windows": 5,
        "seqlen": SEQLEN}
    assert report["protocol"]["name"] == "non-overlapping"
    assert report["peak_rss_bytes"] > 0 and report["seconds"] > 0
    assert f"perplexity   {expected.perplexity:.6g}" in run.output
    assert f"tokens       {5 * (SEQLEN - 1)} scored in 5 windows of {SEQLEN}" in run.output
    assert "GPTQ/SparseGPT protocol" in run.output
    assert f"prompt: {PROMPTS[0]}" in run.output and expected.generations[0].text in run.output


def _broken(models: Path, tmp_path: Path, what: str) -> Path:
    model = _model(models, "llama")
    out = tmp_path / what
    out.mkdir()
    for f in model.iterdir():
        if what != "no-tokenizer" or not f.name.startswith("tokenizer"):
            (out / f.name).write_bytes(f.read_bytes())
    config = json.loads((out / "config.json").read_text())
    if what == "unknown-architecture":
        config.update(model_type="zorblax", architectures=["ZorblaxForCausalLM"])
    if what == "remote-code":
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_zorblax.ZorblaxForCausalLM"}
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize(("case", "message"), [
    ("empty", "empty.txt: empty data (1 empty document); give text to evaluate on"),
    ("short", "data has 5 tokens; one window needs seqlen=32 (use --seqlen 5 or less, or more text)"),
    ("no-tokenizer", "no-tokenizer: no tokenizer transformers can load"),
    ("unknown-architecture", "model_type 'zorblax' is not an architecture transformers"),
    ("remote-code", "needs the checkpoint's own modeling code (auto_map); streammerge runs no code from a "
                    "checkpoint unless --trust-remote-code is given"),
    ("budget", "--max-memory 0.00 GiB is below what running this model takes"),
])
def test_bad_input_is_one_line(models: Path, tmp_path: Path, case: str, message: str) -> None:
    data = tmp_path / ("empty.txt" if case == "empty" else "text.txt")
    data.write_text("" if case == "empty" else "the river of stone" if case == "short" else sample_text(100))
    broken = case in ("no-tokenizer", "unknown-architecture", "remote-code")
    model = _broken(models, tmp_path, case) if broken else _model(models, "llama")
    extra = ["--max-memory", "1MB"] if case == "budget" else []
    run = CliRunner().invoke(main, ["eval", str(model), "--data", str(data), "--seqlen", "32", "-q", *extra])
    assert run.exit_code == 1
    assert message in run.output and run.output.count("\n") == 1 and run.output.startswith("error: ")


def test_missing_transformers_names_the_extra(models: Path, tmp_path: Path) -> None:
    data = tmp_path / "text.txt"
    data.write_text(sample_text(100))
    code = ("import sys; sys.modules['transformers'] = None\n"  # as if it were not installed
            "from streammerge.cli import main; main()")
    run = subprocess.run([sys.executable, "-c", code, "eval", str(_model(models, "llama")),
                          "--data", str(data)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert run.stderr == "error: running a model needs transformers: pip install 'streammerge[eval]'\n"


def test_hub_reference_evaluates_from_the_cache(models: Path, text: str, tmp_path: Path) -> None:
    model = _model(models, "qwen3")
    home = hub_cache(tmp_path / "hf", "acme/tiny-qwen3", {"3" * 40: model}, {"main": "3" * 40})
    data = tmp_path / "text.txt"
    data.write_text(text)
    out = tmp_path / "eval.json"
    env = os.environ | {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "streammerge", "eval", "acme/tiny-qwen3@main",
                          "--data", str(data), "--seqlen", str(SEQLEN), "--json", str(out), "-q"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads(out.read_text())["nll"] == evaluate(model, data, seqlen=SEQLEN).nll
