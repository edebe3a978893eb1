"""Data-aware merges from calibration data to merged weights: a plan's `calibration: {data: ...}`
runs the real calibration (the layer stream over tiny transformers checkpoints) into the cache,
merges with what it measured, and a second run reuses the cache without reading the data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import streammerge
from arch_builder import build_model, sample_text
from conftest import load_output
from streammerge.calibration.calibrate import calibrate
from streammerge.forward import LayerStream

SPEC = {"samples": 3, "seqlen": 24}


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny real Llama and two fine-tunes of it (its weights moved by seeded noise)."""
    root = tmp_path_factory.mktemp("llama-family")
    base = build_model(root, "llama")
    out = {"base": base}
    for seed in (1, 2):
        ft = root / f"ft{seed}"
        ft.mkdir()
        for f in base.iterdir():
            (ft / f.name).write_bytes(f.read_bytes())
        tensors = load_file(str(base / "model.safetensors"))
        g = torch.Generator().manual_seed(seed)
        save_file({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in tensors.items()},
                  str(ft / "model.safetensors"), metadata={"format": "pt"})
        out[f"ft{seed}"] = ft
    for i, name in enumerate(("ft1", "ft2")):
        (root / f"{name}.txt").write_text(sample_text(300, seed=10 + i))
    return out


def _plan(family: dict[str, Path], method: str, calibration: list[dict], parameters: dict) -> dict:
    base = {"base_model": str(family["base"])} if method == "ties" else {}  # regmean, fisher: models only
    return {"merge_method": method, **base, "dtype": "float32", "parameters": parameters,
            "models": [{"model": str(family[n]), "calibration": c, "parameters": {"weight": 1.0}}
                       for n, c in zip(("ft1", "ft2"), calibration)]}


@pytest.mark.parametrize(("method", "parameters", "kinds"), [
    ("ties", {"density": 0.4, "importance": "sparsegpt"}, ["gram"]),
    ("ties", {"density": 0.4, "importance": "wanda"}, ["sqnorm"]),
    ("regmean", {"alpha": 0.9}, ["gram"]),
    ("fisher", {}, ["fisher"]),
])
def test_calibration_data_equals_precomputed_statistics(family: dict[str, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch, method: str,
                                                        parameters: dict, kinds: list[str]) -> None:
    monkeypatch.setenv("STREAMMERGE_CACHE", str(tmp_path / "cache"))
    data = [family["base"].parent / f"{n}.txt" for n in ("ft1", "ft2")]
    stats = [calibrate(family[n], d, kinds=kinds, out=tmp_path / f"stats-{n}", **SPEC)
             for n, d in zip(("ft1", "ft2"), data)]
    precomputed = streammerge.merge(_plan(family, method, [{"stats": str(s)} for s in stats], parameters),
                                    tmp_path / "precomputed", quiet=True)
    from_data = _plan(family, method, [{"data": str(d), **SPEC} for d in data], parameters)
    streammerge.merge(from_data, tmp_path / "from-data", quiet=True)
    expected, got = load_output(precomputed.output), load_output(tmp_path / "from-data")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    plain = load_output(streammerge.merge({**from_data, "parameters": {"density": 0.4}} if method == "ties"
                                          else {**from_data, "merge_method": "linear", "parameters": {}},
                                          tmp_path / "plain", quiet=True).output)
    assert any(not torch.equal(plain[k], got[k]) for k in got)  # the statistics changed the merge

    runs: list[int] = []
    run = LayerStream.run
    monkeypatch.setattr(LayerStream, "run", lambda self, *a, **k: runs.append(1) or run(self, *a, **k))
    import streammerge.calibration.calibrate as calibrate_module
    monkeypatch.setattr(calibrate_module, "read_documents", lambda *a: pytest.fail("the cache was not used"))
    streammerge.merge(from_data, tmp_path / "again", quiet=True)
    assert runs == [] and load_output(tmp_path / "again").keys() == got.keys()
