"""Merging on a CUDA device: every method as on the CPU (within 1e-6 for float32, 1 bf16 ulp),
DARE/DELLA masks bit-identical, out-of-memory retries, the journal, and host memory as bounded as
on the CPU. Skipped where torch sees no GPU; the mergekit goldens run on CUDA in
``test_mergekit_parity.py``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import method_cases
import streammerge
from checkpoint_builder import Arch, Family, write_family
from conftest import load_output
from streammerge.methods import Chunk, get_method
from streammerge.methods.random import Stream
from streammerge.methods.task_arithmetic import _della_keep
from streammerge.verify import verify

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _within(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Within 1e-6 (float32) or one bf16 ulp of ``want`` (with a 1e-6 floor for results near 0)."""
    diff = (got.double() - want.double()).abs()
    if want.dtype == torch.bfloat16:
        return bool((diff <= torch.exp2(torch.floor(torch.log2(want.double().abs().clamp_min(1e-30))) - 7).clamp_min(1e-6)).all())
    return bool((diff <= 1e-6).all())


def _merge_on(device: str, plan: dict, out: Path, **kw) -> dict[str, torch.Tensor]:
    result = streammerge.merge(plan, out, quiet=True, device=device, **kw)
    assert result.device.startswith(device)
    return load_output(out)


@pytest.mark.parametrize("family", ["fp32_family", "bf16_family"])
@pytest.mark.parametrize(("name", "extra"), method_cases.plan_cases())
def test_every_method_matches_the_cpu(name: str, extra: dict, family: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    f: Family = request.getfixturevalue(family)
    dtype = "float32" if family == "fp32_family" else "bfloat16"
    plan = method_cases.plan(name, extra, f.base, f.models, dtype)
    cpu = _merge_on("cpu", plan, tmp_path / "cpu", chunk_size=7 * 32)
    cuda = _merge_on("cuda", plan, tmp_path / "cuda", chunk_size=7 * 32)
    assert cpu.keys() == cuda.keys()
    off = [n for n in cpu if not _within(cuda[n], cpu[n])]
    assert not off, f"{name} {extra}: {len(off)} tensors differ beyond tolerance, e.g. {off[0]}"


def test_draws_and_della_masks_are_bit_identical() -> None:
    s = Stream(7, "model.layers.0.mlp.up_proj.weight", 1)
    for start in (12345, 2**32 - 500_000):  # and across a 2³² block boundary
        assert torch.equal(s.uniform(start, 1_000_003, "cuda").cpu(), s.uniform(start, 1_000_003))
        assert torch.equal(s.below(0.3, start, 1_000_003, "cuda").cpu(), s.below(0.3, start, 1_000_003))
    method = get_method("della")
    params = method_cases.tensor_params(method, {})
    g = torch.Generator().manual_seed(0)
    base, x = torch.randn(64, 48, generator=g), torch.randn(64, 48, generator=g)

    def mask(device: str) -> torch.Tensor:
        chunk = Chunk("w", (64, 48), base.to(device), [x.to(device)], params, 0, 64, 7, (0,))
        return _della_keep(chunk, {}, 0, (x - base).to(device)).cpu()

    assert torch.equal(mask("cuda"), mask("cpu"))


@pytest.mark.parametrize("name", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_random_methods_drop_the_same_entries(name: str, fp32_family: Family, tmp_path: Path) -> None:
    """Where every model's entry is dropped the output is exactly the base, on either device."""
    plan = method_cases.plan(name, {}, fp32_family.base, fp32_family.models, "float32")
    cpu, cuda = _merge_on("cpu", plan, tmp_path / "cpu"), _merge_on("cuda", plan, tmp_path / "cuda")
    base = fp32_family.tensors[fp32_family.base]
    for n, b in base.items():
        assert torch.equal(cpu[n] == b, cuda[n] == b), n
        assert _within(cuda[n], cpu[n]), n


def test_journal_and_manifest_follow_the_writer_thread(fp32_family: Family, tmp_path: Path) -> None:
    plan = method_cases.plan("ties", {}, fp32_family.base, fp32_family.models, "float32")
    streammerge.merge(plan, tmp_path / "out", quiet=True, device="cuda", chunk_size=32)
    assert verify(tmp_path / "out")[0] == []


def test_a_nonfinite_result_stops_the_run_naming_the_tensor(fp32_family: Family, tmp_path: Path) -> None:
    plan = {**method_cases.plan("task_arithmetic", {}, fp32_family.base, fp32_family.models, "float32"),
            "parameters": {"lambda": 1e300}}  # inf in float32
    with pytest.raises(streammerge.StreamMergeError, match="the merged result holds NaN or Inf"):
        streammerge.merge(plan, tmp_path / "out", quiet=True, device="cuda")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def big_family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """Tensors of 8M float32 elements (32 MB per input): a whole-tensor merge needs ~0.6 GB on the GPU."""
    return write_family(tmp_path_factory.mktemp("big"), Arch(hidden=2048, intermediate=4096, layers=1, vocab=64, heads=16, kv_heads=16))


def test_out_of_gpu_memory_retries_in_smaller_chunks(big_family: Family, tmp_path: Path) -> None:
    plan = method_cases.plan("ties", {}, big_family.base, big_family.models, "float32")
    cpu = _merge_on("cpu", plan, tmp_path / "cpu")
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(300e6 / total)  # a real allocator limit, below one whole-tensor merge
    try:
        result = streammerge.merge(plan, tmp_path / "cuda", quiet=True, device="cuda", max_memory="64GiB", max_gpu_memory="64GiB")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert any("out of memory in chunks of 4096 rows" in n for n in result.notes), result.notes
    cuda = load_output(tmp_path / "cuda")
    assert all(_within(cuda[n], cpu[n]) for n in cpu)
    assert verify(tmp_path / "cuda")[0] == []


def _peak_rss(args: list[str]) -> int:
    root = str(Path(__file__).parent.parent)
    proc = subprocess.Popen([sys.executable, "-m", "streammerge", *args], env={**os.environ, "PYTHONPATH": root})
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return usage.ru_maxrss * 1024


def test_host_memory_stays_within_the_budget(big_family: Family, tmp_path: Path) -> None:
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(method_cases.plan("ties", {}, big_family.base, big_family.models, "float32")))
    budget = 2 << 30
    for device in ("cpu", "cuda"):
        peak = _peak_rss(["run", str(plan_file), str(tmp_path / device), "-q", "--device", device, "--max-memory", str(budget)])
        assert peak <= budget, f"{device}: peak RSS {peak / 2**30:.2f} GiB over the {budget / 2**30:.2f} GiB budget"
