"""--device and the device-agnostic engine, on the CPU: resolution, the auto fallback, the
out-of-memory retry, and methods that create every tensor on their inputs' device."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

import method_cases
import streammerge
from checkpoint_builder import Family
from streammerge.cli import main
from streammerge.errors import PlanError, StreamMergeError
from streammerge.methods import Chunk, get_method, registry, run_passes
from streammerge.methods.base import MergeMethod
from streammerge.verify import verify

GOLDEN = Path(__file__).parent / "data" / "golden"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")


def _ties(family: Family, method: str = "ties") -> dict:
    return {"merge_method": method, "base_model": str(family.base), "dtype": "float32",
            "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.4}} for m in family.models]}


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


# --- every method creates its tensors where its inputs are ----------------------------------------

@pytest.mark.parametrize("shape", [(8, 16), (24,)])
@pytest.mark.parametrize(("name", "extra"), method_cases.cases())
def test_methods_create_no_tensor_off_their_inputs_device(name: str, extra: dict, shape: tuple[int, ...]) -> None:
    """Every tensor a method makes must be on its inputs' device, or a CUDA merge fails (or copies to
    the host). Run with the default device set to "meta", a tensor made without ``device=`` lands on
    meta and any arithmetic with the (CPU) inputs raises; the results must equal a plain run's."""
    method = get_method(name)
    n = method_cases.model_count(method)
    g = torch.Generator().manual_seed(1)
    base = torch.randn(shape, generator=g)
    models = [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n)]
    params = method_cases.tensor_params(method, extra)
    has_base = method.base != "model"
    half = shape[0] // 2

    def chunk(start: int, stop: int) -> Chunk:
        return Chunk("model.layers.0.mlp.up_proj.weight", shape, base[start:stop] if has_base else None,
                     [m[start:stop] for m in models], params, start, stop, 7, tuple(range(n)))

    def merged() -> torch.Tensor:
        stats = run_passes(method.passes_for(params), lambda: [chunk(0, half), chunk(half, shape[0])])
        return torch.cat([method.merge(chunk(0, half), stats), method.merge(chunk(half, shape[0]), stats)])

    expected = merged()
    with torch.device("meta"):
        got = merged()
    assert got.device.type == "cpu"
    assert torch.equal(got, expected)


# --- resolving --device ---------------------------------------------------------------------------

@no_cuda
def test_cuda_without_cuda_is_one_line_naming_the_fix(fp32_family: Family, tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump(_ties(fp32_family)))
    result = CliRunner().invoke(main, ["run", str(plan), str(tmp_path / "out"), "--device", "cuda"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"error: device: CUDA requested but torch.cuda.is_available() is false (torch {torch.__version__} "
        f"{'built without CUDA' if torch.version.cuda is None else f'built for CUDA {torch.version.cuda}, but no GPU or driver is usable'}); "
        "use --device cpu or auto"]
    assert not (tmp_path / "out").exists()


@no_cuda
def test_auto_falls_back_to_the_cpu_and_says_so(fp32_family: Family, tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump(_ties(fp32_family)))
    auto = CliRunner().invoke(main, ["run", str(plan), str(tmp_path / "auto"), "--device", "auto"])
    assert auto.exit_code == 0, auto.output
    assert "; device: cpu (no CUDA)" in auto.output.strip().splitlines()[-1]
    cpu = CliRunner().invoke(main, ["run", str(plan), str(tmp_path / "cpu"), "--device", "cpu"])
    assert cpu.output.strip().splitlines()[-1].endswith("; device: cpu")
    assert _shards(tmp_path / "auto") == _shards(tmp_path / "cpu")
    shown = CliRunner().invoke(main, ["plan", str(plan), "--device", "auto"])
    assert "device        cpu (no CUDA)" in shown.output


def test_device_key_is_validated(fp32_family: Family) -> None:
    with pytest.raises(PlanError, match="device"):
        streammerge.schedule({**_ties(fp32_family), "device": "gpu"})
    with pytest.raises(PlanError, match="max_gpu_memory"):
        streammerge.schedule({**_ties(fp32_family), "max_gpu_memory": "lots"})


def test_help_names_the_device_options() -> None:
    text = " ".join(CliRunner().invoke(main, ["run", "--help"]).output.split())
    assert "--device DEVICE" in text and "--max-gpu-memory SIZE" in text
    assert "cpu (default), cuda (or cuda:0; an error without a GPU)" in text
    assert "auto (CUDA when present, else the CPU" in text
    assert "device, max_gpu_memory" in " ".join(CliRunner().invoke(main, ["--help"]).output.split())


# Each golden case's output from the CPU engine before --device existed: the CPU path writes the same bytes.
# karcher, multislerp, sce and nuslerp_rows: since compute_dtype auto follows mergekit's float32 steps
# (bitwise closer to mergekit's goldens: 29,303 -> 23,972, 27,928 -> 27,520, 2,338 -> 1,586 and
# 23,803 -> 162 differing elements, all within 1e-6 before and after).
_BEFORE = {
    "bf16_ties": "15a3fadb65dc94adfacb1cfa9bb22cd14e0c90807be0261ab6f09569e806e2a1",
    "dare_ties": "90b111b0113d9fa377ee1b1968cad0582805f65014f8c590157531e5e102c8ce",  # int32 draws; L1 row sums in float32 (1 ulp off on 3%)
    "della": "c20bcf6ec0cc1e3c1854d0796ddf34e2f4ef4bfff94b67cd8473b57e4bf83700",  # the same (1 ulp off on 2%)
    "karcher": "6a31570ec36ac2bff263be77cc130bd962b6ca8cd79299a628910fae60f388b5",
    "multislerp": "338b5543b0e97c47be33b3b01948fe749c0b59eb98ce2f6c057b03a7502e530d",
    "sce": "fe35835bbf5bcc7905717c6486f4be7a3d9d31207d9ae01b08a7bb761c5bce70",
    "slerp_t065": "2ad97a5ab0c0fde84bb1a6dd1a38dba108302accc6a9f2034179301fb2c1d998",
    "nuslerp_rows": "a3a7dbcd8dc95f73397b684a0fc7af5000830284dc251701dac2fa21d19c4b07",
}


@pytest.mark.parametrize("case", sorted(_BEFORE))
def test_device_cpu_writes_the_same_bytes_as_before(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(GOLDEN)
    streammerge.merge(GOLDEN / "cases" / case / "config.yml", tmp_path / case, quiet=True, device="cpu")
    assert hashlib.sha256((tmp_path / case / "model.safetensors").read_bytes()).hexdigest() == _BEFORE[case]


# --- out of memory: the tensor is merged again in smaller chunks ----------------------------------

def _failing_above(rows: int | None) -> MergeMethod:
    """ties, except that merging a chunk of more than ``rows`` rows (any, with None) runs out of memory."""
    ties = get_method("ties")

    def merge(chunk: Chunk, stats: dict) -> torch.Tensor:
        if rows is None or chunk.row_stop - chunk.row_start > rows:
            raise torch.OutOfMemoryError(f"test: {chunk.row_stop - chunk.row_start} rows")
        return ties.merge(chunk, stats)

    return replace(ties, name="oom_ties", merge=merge)


def test_out_of_memory_retries_in_smaller_chunks_with_the_same_bytes(fp32_family: Family, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry._METHODS, "oom_ties", _failing_above(5))
    reference = streammerge.merge(_ties(fp32_family), tmp_path / "ref", quiet=True)
    result = streammerge.merge(_ties(fp32_family, "oom_ties"), tmp_path / "retried", quiet=True)
    assert _shards(tmp_path / "retried") == _shards(tmp_path / "ref")
    retried = [n for n in result.notes if "out of memory" in n]
    assert "tensor 'model.embed_tokens.weight': out of memory in chunks of 96 rows; merged in chunks of 3" in retried
    assert len(retried) == result.tensors  # every tensor has more than 5 rows
    assert not any("out of memory" in n for n in reference.notes)
    assert verify(tmp_path / "retried")[0] == []


def test_out_of_memory_at_one_row_is_one_line(fp32_family: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry._METHODS, "oom_ties", _failing_above(None))
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump(_ties(fp32_family, "oom_ties")))
    result = CliRunner().invoke(main, ["run", str(plan), str(tmp_path / "out"), "--max-memory", "2GiB"])
    assert result.exit_code == 1
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: tensor 'model.embed_tokens.weight': out of memory on cpu even one row per chunk "
                           "(--max-memory 2.00 GiB); free memory there (other processes?) or use --device cpu")
    assert "Traceback" not in result.output
    with pytest.raises(StreamMergeError, match="even one row per chunk"):
        streammerge.merge(_ties(fp32_family, "oom_ties"), tmp_path / "api", quiet=True)
