"""Broken and hostile inputs, each through the real command line in its own process: exit 1, one
``error:`` line naming the file and the problem, no traceback, nothing at the output path."""

from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from checkpoint_builder import Arch, Family, write_checkpoint

MODEL = "model.safetensors"


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _rewrite(path: Path, change: Callable[[dict], object]) -> None:
    """Rewrite the safetensors header of ``path`` as ``change`` edits it; the data stays as it was."""
    header, data = _header(path)
    change(header)
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


def _second(header: dict) -> str:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])[1]


def _truncated(model: Path) -> tuple[str, str]:
    raw = (model / MODEL).read_bytes()
    (model / MODEL).write_bytes(raw[: len(raw) - 100])
    return MODEL, "past the end of the file"


def _long_header(model: Path) -> tuple[str, str]:
    raw = (model / MODEL).read_bytes()
    (model / MODEL).write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
    return MODEL, f"header length {len(raw)} exceeds the file size"


def _not_json(model: Path) -> tuple[str, str]:
    raw = (model / MODEL).read_bytes()
    (model / MODEL).write_bytes(raw[:8] + b"{" * 10 + raw[18:])
    return MODEL, "header is not valid JSON"


def _not_object(model: Path) -> tuple[str, str]:
    (model / MODEL).write_bytes(struct.pack("<Q", 6) + b"[1, 2]")
    return MODEL, "header is not a JSON object"


def _entry(change: Callable[[dict, str], None], words: Callable[[str], str]) -> Callable[[Path], tuple[str, str]]:
    def make(model: Path) -> tuple[str, str]:
        name = _second(_header(model / MODEL)[0])
        _rewrite(model / MODEL, lambda h: change(h, name))
        return MODEL, words(name)
    return make


def _out_of_bounds(h: dict, name: str) -> None:
    h[name]["shape"][0] += 10**6  # consistent with its offsets, but past the end of the file
    h[name]["data_offsets"][1] = h[name]["data_offsets"][0] + math.prod(h[name]["shape"]) * 4


def _overlapping(h: dict, name: str) -> None:
    h[name]["data_offsets"] = [d - 4 for d in h[name]["data_offsets"]]


def _wrong_size(h: dict, name: str) -> None:
    h[name]["shape"][0] += 1


def _unknown_dtype(h: dict, name: str) -> None:
    h[name]["dtype"] = "F8_E4M3"


def _sharded(model: Path, family: Family, weight_map: Callable[[dict], dict]) -> None:
    tensors = family.tensors[family.models[0]]
    (model / MODEL).unlink()
    names = sorted(tensors)
    half = len(names) // 2
    from safetensors.torch import save_file
    save_file({n: tensors[n] for n in names[:half]}, str(model / "a.safetensors"))
    save_file({n: tensors[n] for n in names[half:]}, str(model / "b.safetensors"))
    mapping = {n: "a.safetensors" for n in names[:half]} | {n: "b.safetensors" for n in names[half:]}
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map(mapping)}))


def _twice(family: Family) -> Callable[[Path], tuple[str, str]]:
    def make(model: Path) -> tuple[str, str]:
        _sharded(model, family, lambda m: m)
        tensors = family.tensors[family.models[0]]
        names = sorted(tensors)
        from safetensors.torch import save_file
        save_file({n: tensors[n] for n in names[len(names) // 2 :] + [names[0]]}, str(model / "b.safetensors"))
        return "", f"tensor {names[0]!r} is stored twice (a.safetensors and b.safetensors)"
    return make


def _missing_shard(family: Family) -> Callable[[Path], tuple[str, str]]:
    def make(model: Path) -> tuple[str, str]:
        _sharded(model, family, lambda m: m | {next(iter(m)): "c.safetensors"})
        return "model.safetensors.index.json", "names shard 'c.safetensors', which does not exist"
    return make


def _escaping(family: Family) -> Callable[[Path], tuple[str, str]]:
    def make(model: Path) -> tuple[str, str]:
        shutil.copy(family.models[1] / MODEL, model.parent / "outside.safetensors")
        _sharded(model, family, lambda m: m | {next(iter(m)): "../outside.safetensors"})
        return "model.safetensors.index.json", "shard path '../outside.safetensors' points outside the model directory"
    return make


class _Evil:
    """Unpickling this runs ``open(marker, "w")``: a file appears if pickle code is ever executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def _pickle_code(family: Family) -> Callable[[Path], tuple[str, str]]:
    def make(model: Path) -> tuple[str, str]:
        (model / MODEL).unlink()
        torch.save({**family.tensors[family.models[0]], "evil": _Evil(model / "PWNED")}, model / "pytorch_model.bin")
        return "pytorch_model.bin", "cannot load as a weights-only PyTorch checkpoint"
    return make


def _nan(family: Family) -> Callable[[Path], tuple[str, str]]:
    def make(model: Path) -> tuple[str, str]:
        tensors = dict(family.tensors[family.models[0]])
        name = "model.layers.1.mlp.up_proj.weight"
        tensors[name] = tensors[name].clone()
        tensors[name][2, 3] = float("inf")
        write_checkpoint(model, tensors, family.arch.config(torch.float32))
        return MODEL, f"tensor {name!r} holds NaN or Inf; fix the input, or pass --allow-nonfinite"
    return make


def cases(family: Family) -> dict[str, Callable[[Path], tuple[str, str]]]:
    """Each case corrupts a copy of the first fine-tune and says which file the error names and how."""
    return {
        "truncated shard": _truncated,
        "header length past the file": _long_header,
        "header not JSON": _not_json,
        "header not an object": _not_object,
        "offsets out of bounds": _entry(_out_of_bounds, lambda n: f"tensor {n!r}: data ends at byte"),
        "overlapping tensors": _entry(_overlapping, lambda n: "overlap in the file"),
        "offsets not shape x dtype": _entry(_wrong_size, lambda n: f"tensor {n!r}: data_offsets span"),
        "unknown dtype": _entry(_unknown_dtype, lambda n: f"tensor {n!r}: unsupported dtype 'F8_E4M3'"),
        "a tensor in two shards": _twice(family),
        "index names a missing shard": _missing_shard(family),
        "index path escapes the model": _escaping(family),
        "pickle with code": _pickle_code(family),
        "NaN or Inf in an input": _nan(family),
    }


def _run(plan: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "streammerge", "run", str(plan), str(out), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def outcomes(fp32_family: Family, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """Every case in its own process, four at a time (they are independent)."""
    root = tmp_path_factory.mktemp("hostile")
    running: dict[str, tuple] = {}
    for k, (case, make) in enumerate(cases(fp32_family).items()):
        if k >= 4:
            running[list(running)[k - 4]][0].wait()
        where = root / f"case{k}"
        model = where / "models" / "ft1"
        shutil.copytree(fp32_family.models[0], model)
        file, words = make(model)
        plan = where / "plan.yaml"
        plan.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(fp32_family.base), "models": [
            {"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}} for m in (model, *fp32_family.models[1:])]}))
        running[case] = (_run(plan, where / "out"), model / file, words, where)
    return {case: (proc.wait(), proc.stderr.read(), file, words, where) for case, (proc, file, words, where) in running.items()}


@pytest.mark.parametrize("case", list(cases(Family(Path(), [], {}, Arch()))))
def test_each_broken_input_is_one_error_line_naming_the_file(case: str, outcomes: dict[str, tuple]) -> None:
    code, stderr, file, words, where = outcomes[case]
    assert code == 1 and "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {file}"), lines
    assert words in lines[0], (words, lines[0])
    assert not (where / "out").exists()
    assert not (where / "models" / "ft1" / "PWNED").exists()  # no pickle code ran


def test_a_non_finite_merge_result_is_an_error(tmp_path: Path) -> None:
    """fp16 task vectors that are finite but sum past 65504 overflow to Inf in fp16 arithmetic."""
    arch = Arch(layers=1)
    base = {n: torch.zeros(s) for n, s in arch.shapes().items()}
    big = {n: torch.full(s, 40000.0) for n, s in arch.shapes().items()}
    config = arch.config(torch.float16)
    paths = [write_checkpoint(tmp_path / name, t, config, dtype=torch.float16) for name, t in (("b", base), ("x", big), ("y", big))]
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(paths[0]), "dtype": "float16",
                                    "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in paths[1:]]}))
    proc = _run(plan, tmp_path / "out")
    code, stderr = proc.wait(), proc.stderr.read()
    assert code == 1 and "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: tensor 'model.embed_tokens.weight': the merged result holds NaN or Inf")
    assert "compute_dtype: float32" in lines[0] and "the partial output is kept in" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where,words", [
    (lambda m: m, "may not be an input model directory or inside one"),
    (lambda m: m / "merged", "may not be an input model directory or inside one"),
    (lambda m: m.parent, "may not contain an input model"),
])
def test_the_output_is_never_an_input_inside_one_or_around_one(where: Callable[[Path], Path], words: str,
                                                                fp32_family: Family, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from streammerge.cli import main

    model = tmp_path / "models" / "ft1"
    shutil.copytree(fp32_family.models[0], model)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(m), "parameters": {"weight": 1.0}} for m in (model, fp32_family.models[1])]}))
    result = CliRunner().invoke(main, ["run", str(plan), str(where(model)), "--overwrite"])
    assert result.exit_code == 1 and result.output.startswith(f"error: {where(model)}: the output {words}")
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    assert not list(tmp_path.rglob("*.streammerge-partial"))
