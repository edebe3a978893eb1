from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from checkpoint_builder import Family, write_family


@pytest.fixture(scope="session")
def fp32_family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return write_family(tmp_path_factory.mktemp("fp32"), dtype=torch.float32)


@pytest.fixture(scope="session")
def sharded_family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return write_family(tmp_path_factory.mktemp("sharded"), dtype=torch.float32, shards=3)


@pytest.fixture(scope="session")
def bf16_family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return write_family(tmp_path_factory.mktemp("bf16"), dtype=torch.bfloat16)


def hub_cache(root: Path, repo: str, snapshots: dict[str, Path], refs: dict[str, str]) -> Path:
    """A huggingface_hub cache (hub/models--org--name/{snapshots,refs}) holding copies of local models."""
    folder = root / "hub" / f"models--{repo.replace('/', '--')}"
    for commit, model in snapshots.items():
        shutil.copytree(model, folder / "snapshots" / commit)
    (folder / "refs").mkdir(parents=True)
    for ref, commit in refs.items():
        (folder / "refs" / ref).write_text(commit)
    return root


def load_output(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face output directory, read with safetensors' own loader."""
    index = path / "model.safetensors.index.json"
    if not index.exists():
        return load_file(str(path / "model.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        out |= load_file(str(path / shard))
    return out


def merge_with_chunk_sizes(plan: dict, tmp_path: Path, sizes: tuple[int, ...] = (32, 7 * 32, 10**9)) -> list[dict[str, bytes]]:
    """The output shards' bytes for each chunk size (elements; the fixtures' rows are 32 wide)."""
    import streammerge

    outputs = []
    for size in sizes:
        out = tmp_path / f"chunk{size}"
        streammerge.merge(plan, out, quiet=True, chunk_size=size)
        outputs.append({p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))})
    return outputs


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The corpus test's count per class (tests/test_corpus.py), when it ran."""
    module = sys.modules.get("test_corpus")
    if module is not None and module.RESULTS:
        terminalreporter.write_line(module.summary())
