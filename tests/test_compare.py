"""``compare`` and ``streammerge compare``: every row is the merge ``streammerge.merge`` writes for
that plan, scored exactly as ``evaluate`` scores that directory."""

from __future__ import annotations

import json
import random
import warnings
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

import streammerge
from checkpoint_builder import write_tokenizer
from conftest import load_output
from streammerge.cli import main
from streammerge.evaluation.compare import NO_CHART, compare
from streammerge.evaluation.compare_command import _gather_methods
from streammerge.evaluation.evaluate import evaluate
from streammerge.evaluation.windows import Protocol
from streammerge.methods import method_names

pytest.importorskip("transformers")

PROTOCOL = {"seqlen": 16, "samples": 4}
CLI_PROTOCOL = ["--seqlen", "16", "--samples", "4", "-q"]
WORDS = ["<unk>", "<s>", "</s>"] + [chr(97 + i) for i in range(26)] + [f"w{i}" for i in range(128 - 29)]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base, ft1 and ft2: a tiny Llama saved by transformers and two perturbations of it, each with
    a tokenizer over WORDS; data.txt, 400 random words; ties.yaml, a mergekit plan over them."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    root = tmp_path_factory.mktemp("compare")
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for name, seed in (("base", None), ("ft1", 1), ("ft2", 2)):
        if seed is not None:
            g = torch.Generator().manual_seed(seed)
            model.load_state_dict({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()})
        model.save_pretrained(root / name)
        (root / name / "tokenizer_config.json").write_text(
            json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
        write_tokenizer(root / name, WORDS)
    rng = random.Random(0)
    (root / "data.txt").write_text(" ".join(rng.choice(WORDS[3:]) for _ in range(400)))
    (root / "ties.yaml").write_text(yaml.safe_dump(plan_doc(Path("."), "ties")))  # paths relative to the plan
    return root


def plan_doc(root: Path, method: str, density: float | None = 0.5) -> dict:
    """The plan of ties.yaml with ``method``; model 0 sets its own density (a ties parameter)."""
    own = {"density": 0.7} if method in ("ties", "dare_ties") else {}
    doc = {"merge_method": method, "base_model": str(root / "base"),
           "models": [{"model": str(root / "ft1"), "parameters": {"weight": 1.0, **own}},
                      {"model": str(root / "ft2"), "parameters": {"weight": 0.5}}],
           "dtype": "float32"}
    return doc | ({"parameters": {"density": density}} if own and density is not None else {})


def reference_merge(plan: dict, out: Path) -> dict[str, torch.Tensor]:
    streammerge.merge(plan, out, quiet=True)
    return load_output(out)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def run(*args: object) -> object:
    return CliRunner().invoke(main, ["compare", *(str(a) for a in args)])


def test_methods_and_inputs(models: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    data = models / "data.txt"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = compare([models / "ties.yaml"], data, out, methods=["ties", "dare_ties", "task_arithmetic"],
                         with_inputs=True, **PROTOCOL)
    dropped = [str(w.message) for w in caught if "not of task_arithmetic" in str(w.message)]
    assert dropped == [f"{models / 'ties.yaml'}: parameters, models[0].parameters: 'density' is a "
                       "parameter of ties, not of task_arithmetic; the task_arithmetic merge leaves it out"]

    assert [(r.name, r.method) for r in result.rows] == [
        ("base", "base"), ("ft1", "input"), ("ft2", "input"),
        ("ties", "ties"), ("dare_ties", "dare_ties"), ("task_arithmetic", "task_arithmetic")]
    for row in result.rows[:3]:  # baselines: the inputs themselves, unmerged
        expected = evaluate(models / row.name, data, **PROTOCOL)
        assert (row.perplexity, row.nll, row.tokens) == (expected.perplexity, expected.nll, expected.tokens)
        assert row.merge_seconds is None and row.output == str((models / row.name).resolve())
    for row in result.rows[3:]:
        assert row.output == str(out / row.method)
        assert_same_tensors(load_output(out / row.method),
                            reference_merge(plan_doc(models, row.method), tmp_path / f"ref-{row.method}"))
        expected = evaluate(out / row.method, data, **PROTOCOL)
        assert (row.perplexity, row.nll, row.tokens) == (expected.perplexity, expected.nll, expected.tokens)
        assert row.merge_seconds > 0 and row.eval_seconds > 0
    assert len({r.perplexity for r in result.rows}) == 6  # six different models
    assert all(r.peak_rss_bytes > 2**20 for r in result.rows)

    saved = json.loads((out / "comparison.json").read_text())
    assert saved == {"data": str(data), "text_field": "text", "protocol": Protocol(16, None, 4).as_dict(),
                     "dtype": "auto", "rows": [asdict(r) for r in result.rows]}
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert result.chart is None and result.notes == [NO_CHART]
    else:
        assert result.chart == out / "comparison.png" and result.notes == []
        assert result.chart.read_bytes()[:8] == PNG


def test_cli_methods_and_param(models: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    result = run(models / "ties.yaml", "--methods", "ties", "dare_ties", "--data", models / "data.txt",
                 "-o", out, "--param", "ties.density=0.3", *CLI_PROTOCOL)
    assert result.exit_code == 0, result.output
    assert (f"warning: {models / 'ties.yaml'}: models[0].parameters.density takes precedence over "
            "--param ties.density=0.3 there") in result.stderr
    ties = load_output(out / "ties")
    assert_same_tensors(ties, reference_merge(plan_doc(models, "ties", density=0.3), tmp_path / "ref03"))
    other = reference_merge(plan_doc(models, "ties", density=0.9), tmp_path / "ref09")
    assert any(not torch.equal(ties[k], other[k]) for k in ties)
    assert_same_tensors(load_output(out / "dare_ties"), reference_merge(plan_doc(models, "dare_ties"),
                                                                         tmp_path / "ref-dare"))

    rows = json.loads((out / "comparison.json").read_text())["rows"]
    lines = result.stdout.splitlines()
    assert lines[0].split() == "name method perplexity loss merge s eval s peak GiB".split()
    for line, row in zip(lines[1:], rows, strict=True):
        assert line.split() == [row["name"], row["method"], f"{row['perplexity']:.6g}", f"{row['nll']:.6f}",
                                f"{row['merge_seconds']:.1f}", f"{row['eval_seconds']:.1f}",
                                f"{row['peak_rss_bytes'] / 2**30:.2f}"]
    assert len({len(line) for line in lines}) == 1  # aligned: numbers end in one column
    assert f"protocol: {Protocol(16, None, 4).describe()}" in result.stderr


def test_several_plans(models: Path, tmp_path: Path) -> None:
    plans = tmp_path / "plans"
    plans.mkdir()
    (plans / "mine.yaml").write_text(yaml.safe_dump(plan_doc(models, "ties")))
    (plans / "avg.yaml").write_text(yaml.safe_dump({"merge_method": "linear", "dtype": "float32", "models": [
        {"model": str(models / "ft1"), "parameters": {"weight": 1.0}},
        {"model": str(models / "ft2"), "parameters": {"weight": 3.0}}]}))
    out = tmp_path / "runs"
    result = run(plans / "mine.yaml", plans / "avg.yaml", "--data", models / "data.txt", "-o", out,
                 *CLI_PROTOCOL)
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    assert [(r["name"], r["method"]) for r in rows] == [("mine", "ties"), ("avg", "linear")]
    for row in rows:
        plan = yaml.safe_load((plans / f"{row['name']}.yaml").read_text())
        reference = reference_merge(plan, tmp_path / f"ref-{row['name']}")
        assert_same_tensors(load_output(out / row["name"]), reference)
        expected = evaluate(out / row["name"], models / "data.txt", **PROTOCOL)
        assert (row["perplexity"], row["nll"]) == (expected.perplexity, expected.nll)


def test_without_matplotlib(models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # `import matplotlib` fails
    out = tmp_path / "runs"
    result = run(models / "ties.yaml", "--data", models / "data.txt", "-o", out, *CLI_PROTOCOL)
    assert result.exit_code == 0, result.output
    assert f"note: {NO_CHART}" in result.stderr
    assert "pip install 'streammerge[plot]'" in NO_CHART
    assert sorted(p.name for p in out.iterdir()) == ["comparison.json", "ties"]


def test_rerun(models: Path, tmp_path: Path) -> None:
    """A merge already in its directory is kept; another merge there is refused before any work."""
    out = tmp_path / "runs"
    first = compare([models / "ties.yaml"], models / "data.txt", out, methods=["ties"], **PROTOCOL)
    written = (out / "ties" / "model.safetensors").stat().st_mtime_ns
    again = compare([models / "ties.yaml"], models / "data.txt", out, methods=["ties"], **PROTOCOL)
    assert again.notes[0] == (f"ties: {out / 'ties'} already held this merge; it was not merged again "
                              "(--overwrite merges it again)")
    assert (out / "ties" / "model.safetensors").stat().st_mtime_ns == written
    assert again.rows[0].perplexity == first.rows[0].perplexity
    result = run(models / "ties.yaml", "--methods", "ties", "--param", "ties.density=0.3", "--data",
                 models / "data.txt", "-o", out, *CLI_PROTOCOL)
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.splitlines()[-1] == (f"error: {out / 'ties'}: output already exists and holds "
                                              "another merge; pass --overwrite to replace it, or choose "
                                              "another -o")
    result = run(models / "ties.yaml", "--methods", "ties", "--param", "ties.density=0.3", "--data",
                 models / "data.txt", "-o", out, "--overwrite", *CLI_PROTOCOL)
    assert result.exit_code == 0, result.output
    assert_same_tensors(load_output(out / "ties"), reference_merge(plan_doc(models, "ties", density=0.3),
                                                                   tmp_path / "ref03"))


def test_gather_methods(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("plan").write_text("")  # an existing file ends the names, as a .yaml name does
    names = ["ties", "dare_ties", "task_arithmetic"]
    assert _gather_methods(["p.yaml", "--methods", *names, "--data", "d"]) == [
        "p.yaml", "--methods", "ties,dare_ties,task_arithmetic", "--data", "d"]
    assert _gather_methods(["--methods", "ties", "linear", "p.yml", "-o", "x"]) == [
        "--methods", "ties,linear", "p.yml", "-o", "x"]
    assert _gather_methods(["--methods", "ties", "plan"]) == ["--methods", "ties", "plan"]
    assert _gather_methods(["--methods", "a", "--methods", "b", "c"]) == [
        "--methods", "a", "--methods", "b,c"]
    assert _gather_methods(["--methods=a,b", "--", "--methods", "x", "y"]) == [
        "--methods=a,b", "--", "--methods", "x", "y"]


@pytest.mark.parametrize("args, message", [
    (["--methods", "ties", "tie"], f"--methods: unknown method 'tie' (valid: {', '.join(method_names())})"),
    (["--methods", "ties,ties"], "--methods: ties is given twice; name each method once"),
    (["--methods", "ties", "--param", "linear.weight=1"],
     "--param linear.weight: 'linear' is not in --methods (ties); add it there or drop the parameter"),
    (["--methods", "ties", "--param", "ties.t=0.5"],
     "--param ties.t: ties has no parameter 't' (valid: damp, density, importance, int8_mask, lambda, "
     "normalize, rescale, weight)"),
    (["--methods", "ties", "--param", "ties.density"],
     "--param 'ties.density': expected METHOD.KEY=VALUE, e.g. --param ties.density=0.5"),
    (["--methods", "ties", "--param", "density=0.3"],
     "--param 'density=0.3': expected METHOD.KEY=VALUE, e.g. --param ties.density=0.5"),
    (["--methods", "ties", "--param", "ties.density=[0.3"],
     "--param 'ties.density=[0.3': the value is not valid YAML (while parsing a flow sequence)"),
    (["--param", "ties.density=0.3"],
     "--param ties.…: parameters per method go with --methods; without it each plan's own parameters "
     "are used"),
    (["--methods", "ties", "--param", "ties.density=2"],
     "PLAN: parameters.density: got 2.0, expected a number with 0.0 < density <= 1.0 (in the plan merged "
     "with ties)"),
])
def test_errors(models: Path, tmp_path: Path, args: list[str], message: str) -> None:
    result = run(models / "ties.yaml", *args, "--data", models / "data.txt", "-o", tmp_path / "runs")
    assert result.exit_code == 1
    *warned, error = result.stderr.splitlines()
    assert error == f"error: {message.replace('PLAN', str(models / 'ties.yaml'))}"
    assert all(line.startswith("warning: ") for line in warned)  # model 0's own density, in the last case
    assert not (tmp_path / "runs").exists()  # refused before any merge


def test_data_shorter_than_a_window(models: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    text = (models / "data.txt").read_text()
    tokens = len(AutoTokenizer.from_pretrained(models / "base")(text)["input_ids"])
    result = run(models / "ties.yaml", "--methods", "ties", "--data", models / "data.txt",
                 "-o", tmp_path / "runs", "--seqlen", tokens + 1, "-q")
    assert (result.exit_code, result.stderr) == (
        1, f"error: data has {tokens} tokens; one window needs seqlen={tokens + 1} (use --seqlen {tokens} or "
           "less, or more text)\n")
    assert not (tmp_path / "runs").exists()  # refused before any merge


def test_plan_errors(models: Path, tmp_path: Path) -> None:
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "ties.yaml").write_text((models / "ties.yaml").read_text())
    common = ["--data", models / "data.txt", "-o", tmp_path / "runs"]
    cases = [
        ([models / "ties.yaml", other / "ties.yaml", "--methods", "ties", *common],
         "--methods runs one plan with each method, but 2 plans were given; give one plan with --methods, "
         "or several plans without it"),
        ([models / "ties.yaml", other / "ties.yaml", *common],
         "two plans are named 'ties' (rows and output directories are named by the file name); rename one"),
        ([models / "ties.yaml", "--methods", "slerp", *common],
         f"{models / 'ties.yaml'}: models: slerp merges exactly 2 models including base_model, got 3 "
         "(in the plan merged with slerp)"),
    ]
    for args, message in cases:
        result = run(*args)
        *warned, error = result.stderr.splitlines()
        assert (result.exit_code, error) == (1, f"error: {message}")
        assert all(line.startswith("warning: ") for line in warned)
    assert not (tmp_path / "runs").exists()
