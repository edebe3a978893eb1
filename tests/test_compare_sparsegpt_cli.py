"""`streammerge compare --base-model B --finetuned-models M1 M2 --datasets D1 D2 --density d`, the
LLaMA merge script's command line: its three merges equal the native plans they stand for, its
results are `evaluate()` of each merge on each dataset, and a rerun reuses the statistics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

import streammerge
import streammerge.calibration.calibrate as calibrate_module
from streammerge.calibration.calibrate import calibrate
from conftest import load_output
from streammerge.cli import main
from streammerge.evaluation.evaluate import evaluate
from test_data_aware_end_to_end import family  # noqa: F401 - the fixture: a tiny Llama and two fine-tunes

DENSITY, CALIBRATION, SEQLEN, SAMPLES = 0.4, 3, 16, 2


def _compare(*args: object) -> Result:
    return CliRunner().invoke(main, ["compare", *(str(a) for a in args)])


def _native(family: dict[str, Path], method: str, parameters: dict, calibration: list[dict] | None) -> dict:
    """The plan a user would write for one of the script's merges."""
    return {"merge_method": method, "base_model": str(family["base"]), "parameters": parameters,
            "models": [{"model": str(family[n]), "parameters": {"weight": 1.0},
                        **({"calibration": c} if calibration else {})}
                       for n, c in zip(("ft1", "ft2"), calibration or [{}, {}])]}


def test_script_merges_equal_native_plans_and_results_equal_evaluate(
        family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    data = [str(family["base"].parent / f"{n}.txt") for n in ("ft1", "ft2")]
    out, cache = tmp_path / "runs", tmp_path / "cache"
    monkeypatch.setenv("STREAMMERGE_CACHE", str(tmp_path / "default-cache"))  # the native plans' cache
    flags = ["--datasets", *data, "--density", DENSITY, "--seqlen", SEQLEN, "--samples", SAMPLES, "-q"]
    result = _compare("--base_model", family["base"], "--finetuned_models", family["ft1"], family["ft2"],
                      *flags, "--num_calibration_samples", CALIBRATION, "--cache_dir", cache, "-o", out)
    assert result.exit_code == 0, result.output

    windows = [{"data": d, "samples": CALIBRATION, "seqlen": SEQLEN} for d in data]
    natives = {"ties_magnitude": _native(family, "ties", {"density": DENSITY}, None),
               "dare_random": _native(family, "dare_linear",
                                      {"density": DENSITY, "normalize": False, "rescale": True}, None),
               "ties_sparsegpt": _native(family, "ties", {"density": DENSITY, "importance": "sparsegpt"},
                                         windows)}
    for name, plan in natives.items():
        expected = load_output(streammerge.merge(plan, tmp_path / f"native-{name}", quiet=True).output)
        got = load_output(out / name)
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in got), name
    magnitude, sparsegpt = load_output(out / "ties_magnitude"), load_output(out / "ties_sparsegpt")
    assert any(not torch.equal(magnitude[k], sparsegpt[k]) for k in magnitude)  # the statistics mattered

    results = json.loads((out / "comparison_results.json").read_text())
    assert results["datasets"] == data and results["density"] == DENSITY
    rows = {(r["method"], r["dataset"]): r for r in results["rows"]}
    assert list(rows) == [(n, d) for n in natives for d in data]
    for (name, d), row in rows.items():
        scored = evaluate(out / name, d, seqlen=SEQLEN, samples=SAMPLES)
        assert (row["perplexity"], row["avg_loss"], row["num_tokens"]) == (scored.perplexity, scored.nll,
                                                                            scored.tokens)
        assert row["merge_method"] == natives[name]["merge_method"] and row["merge_time"] > 0
    assert [line.split()[:2] for line in result.stdout.splitlines()[1:]] == [list(k) for k in rows]
    assert len(json.loads((out / "comparison.json").read_text())["rows"]) == 3  # compare's, on D1

    # a rerun (the dashed spellings) measures nothing: the statistics come from --cache-dir
    entries = sorted((p, p.stat().st_mtime_ns) for p in (cache / "statistics").rglob("*"))
    assert len(list((cache / "statistics").iterdir())) == 2  # one entry per fine-tune
    monkeypatch.setattr(calibrate_module, "read_documents", lambda *a: pytest.fail("calibrated again"))
    again = _compare("--base-model", family["base"], "--finetuned-models", family["ft1"], family["ft2"],
                     *flags, "--num-calibration-samples", CALIBRATION, "--cache-dir", cache, "-o", out,
                     "--overwrite")
    assert again.exit_code == 0, again.output
    assert sorted((p, p.stat().st_mtime_ns) for p in (cache / "statistics").rglob("*")) == entries
    assert all(torch.equal(sparsegpt[k], t) for k, t in load_output(out / "ties_sparsegpt").items())


def test_one_dataset_is_shared_and_methods_add_merges(family: dict[str, Path],  # noqa: F811
                                                       tmp_path: Path) -> None:
    text = str(family["base"].parent / "ft1.txt")
    out = tmp_path / "runs"
    result = _compare("--base-model", family["base"], "--finetuned-models", family["ft1"], family["ft2"],
                      "--datasets", text, "--methods", "task_arithmetic", "--density", DENSITY,
                      "--num-calibration-samples", CALIBRATION, "--seqlen", SEQLEN, "--samples", SAMPLES,
                      "--cache-dir", tmp_path / "cache", "-o", out, "-q")
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "comparison_results.json").read_text())["rows"]
    assert [(r["method"], r["dataset"]) for r in rows] == [
        (n, text) for n in ("ties_magnitude", "dare_random", "ties_sparsegpt", "task_arithmetic")]
    # each fine-tune measured on the one dataset: its own statistics, computed here without a cache
    stats = [{"stats": str(calibrate(family[n], text, samples=CALIBRATION, seqlen=SEQLEN, kinds=["gram"],
                                     out=tmp_path / f"stats-{n}"))} for n in ("ft1", "ft2")]
    sparsegpt = {"density": DENSITY, "importance": "sparsegpt"}
    natives = {"ties_sparsegpt": _native(family, "ties", sparsegpt, stats),
               "task_arithmetic": _native(family, "task_arithmetic", {}, None)}
    for name, plan in natives.items():
        expected = load_output(streammerge.merge(plan, tmp_path / f"native-{name}", quiet=True).output)
        got = load_output(out / name)
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in got), name
    assert len(list((tmp_path / "cache" / "statistics").iterdir())) == 2  # one entry per fine-tune


@pytest.mark.parametrize(("args", "message"), [
    (["plan.yaml", "--base-model", "B", "--finetuned-models", "M1", "--datasets", "D1"],
     "error: --base-model: the merge script's flags build the plans, but PLAN plan.yaml was given too; "
     "give either PLAN files or --base-model/--finetuned-models/--datasets"),
    (["--base_model", "B", "--finetuned_models", "M1", "M2", "M3", "--datasets", "D1", "D2"],
     "error: --datasets: 2 datasets for 3 fine-tuned models; give one per model, in the same order, "
     "or one shared by all"),
    (["--finetuned-models", "M1", "M2", "--datasets", "D1", "D2"],
     "error: --base-model: missing; the 2 fine-tuned models are merged as task vectors from it: "
     "add --base-model B"),
    (["--base-model", "B", "--finetuned-models", "M1", "--datasets", "D1", "--data", "x.txt"],
     "error: --data: not taken with the merge script's flags (--base-model): each merge is evaluated on "
     "--datasets with the script's parameters; drop it, or write a PLAN"),
    (["--base-model", "B", "--finetuned-models", "M1", "--datasets", "D1", "--methods", "ties_sparsegpt"],
     "error: --methods: ties_magnitude, dare_random and ties_sparsegpt are merged anyway; name other "
     "methods"),
])
def test_refusals(tmp_path: Path, args: list[str], message: str) -> None:
    result = _compare(*args, "-o", tmp_path / "runs")
    assert (result.exit_code, result.output) == (1, message + "\n")
    assert not (tmp_path / "runs").exists()
