"""nuslerp, multislerp and karcher end to end, against straightforward float64 whole-tensor
restatements of mergekit 0.1.5's algorithms (written out here, independent of the engine)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import pytest
import torch

import streammerge
from checkpoint_builder import Arch, Family, write_checkpoint
from conftest import load_output, merge_with_chunk_sizes
from streammerge.errors import PlanError

Tensor = torch.Tensor


def _slerp_rows(t: float, a: Tensor, b: Tensor) -> Tensor:
    """mergekit's nuslerp on each row of a and b."""
    out = []
    for x, y in zip(a, b):
        cos = (x @ y).item() / (max(x.norm().item(), 1e-7) * max(y.norm().item(), 1e-7))
        theta = math.acos(min(max(cos, -1.0), 1.0))
        if abs(math.sin(theta)) < 1e-8:
            out.append((1 - t) * x + t * y)
        else:
            out.append((math.sin((1 - t) * theta) * x + math.sin(t * theta) * y) / math.sin(theta))
    return torch.stack(out)


def ref_nuslerp(xs: list[Tensor], ws: list[float], base: Tensor | None = None, flatten: bool = True,
                row_wise: bool = False) -> Tensor:
    b = torch.zeros_like(xs[0], dtype=torch.float64) if base is None else base.double()
    v0, v1 = (x.double() - b for x in xs)
    t = 0.5 if abs(sum(ws)) < 1e-6 else ws[1] / sum(ws)
    if flatten or v0.dim() < 2:
        out = _slerp_rows(t, v0.reshape(1, -1), v1.reshape(1, -1))
    elif row_wise:  # vectors along dim 0: the columns of a matrix
        out = _slerp_rows(t, v0.T, v1.T).T
    else:
        out = _slerp_rows(t, v0, v1)
    return b + out.reshape(v0.shape)


def ref_multislerp(xs: list[Tensor], ws: list[float], base: Tensor | None = None, normalize: bool = True,
                   eps: float = 1e-8) -> Tensor:
    """Including the tangent-space step, as mergekit computes it."""
    b = torch.zeros_like(xs[0], dtype=torch.float64) if base is None else base.double()
    x = torch.stack([v.double() - b for v in xs]).reshape(len(xs), -1)
    w = torch.tensor(ws, dtype=torch.float64)
    w = w / w.sum() if normalize else w
    norms = x.norm(dim=1, keepdim=True)
    units = x / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean = mean / mean.norm()
    tangent = (w[:, None] * (units - (units @ mean)[:, None] * mean)).sum(0)
    length = tangent.norm() + eps
    out = (mean * torch.cos(length) + tangent * torch.sin(length) / length) * (norms[:, 0] * w).sum()
    return b + out.reshape(b.shape)


def ref_karcher(xs: list[Tensor], max_iter: int = 10, tol: float = 1e-5) -> Tensor:
    flat = [x.double().reshape(-1) for x in xs]
    norms = [v.norm().item() for v in flat]
    units = [v / n if n > 0 else torch.zeros_like(v) for v, n in zip(flat, norms)]
    valid = [u for u, n in zip(units, norms) if n > tol]
    a = 1 / len(valid)
    u = sum(a * v for v in valid)
    u = valid[0] if u.norm() < tol else u / u.norm()
    for _ in range(max_iter):
        step = torch.zeros_like(u)
        for v in valid:
            cos = torch.clamp(u @ v, -1, 1)
            theta = torch.acos(cos)
            if theta >= tol:
                step += a * theta / torch.sin(theta) * (v - cos * u)
        length = step.norm()
        if length < tol:
            break
        u = torch.cos(length) * u + torch.sin(length) * step / length
        if u.norm() > tol:
            u = u / u.norm()
    return (sum(norms) / len(xs) * u).reshape(xs[0].shape)


def _models(paths: list[Path], ws: list[float] | None = None) -> list[dict]:
    return [{"model": str(p)} | ({"parameters": {"weight": w}} if ws else {}) for p, w in zip(paths, ws or [None] * len(paths))]


Reference = Callable[[Tensor, list[Tensor]], Tensor]  # (base, [ft1, ft2, ft3]) -> float64

# (plan for a family, reference)
CASES: dict[str, tuple[Callable[[Family], dict], Reference]] = {
    "nuslerp": (
        lambda f: {"merge_method": "nuslerp", "models": _models([f.models[0], f.models[2]], [0.3, 0.9])},
        lambda b, xs: ref_nuslerp([xs[0], xs[2]], [0.3, 0.9]),
    ),
    "nuslerp_rows": (
        lambda f: {"merge_method": "nuslerp", "models": _models(f.models[:2], [0.6, 0.4]), "parameters": {"nuslerp_flatten": False}},
        lambda b, xs: ref_nuslerp(xs[:2], [0.6, 0.4], flatten=False),
    ),
    "nuslerp_base": (
        lambda f: {"merge_method": "nuslerp", "base_model": str(f.base), "models": _models(f.models[1:], [0.55, 0.45])},
        lambda b, xs: ref_nuslerp(xs[1:], [0.55, 0.45], b),
    ),
    "nuslerp_base_columns": (
        lambda f: {"merge_method": "nuslerp", "base_model": str(f.base), "models": _models(f.models[:2], [0.2, 0.7]),
                   "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}},
        lambda b, xs: ref_nuslerp(xs[:2], [0.2, 0.7], b, flatten=False, row_wise=True),
    ),
    "multislerp": (
        lambda f: {"merge_method": "multislerp", "models": _models(f.models, [0.5, 0.2, 0.3])},
        lambda b, xs: ref_multislerp(xs, [0.5, 0.2, 0.3]),
    ),
    "multislerp_base_unnormalized": (
        lambda f: {"merge_method": "multislerp", "base_model": str(f.base), "models": _models(f.models, [0.8, 0.3, 0.6]),
                   "parameters": {"normalize_weights": False}},
        lambda b, xs: ref_multislerp(xs, [0.8, 0.3, 0.6], b, normalize=False),
    ),
    "karcher": (
        lambda f: {"merge_method": "karcher", "models": _models(f.models), "parameters": {"max_iter": 25, "tol": 1e-9}},
        lambda b, xs: ref_karcher(xs, 25, 1e-9),
    ),
    "karcher_base_one_step": (  # the base is one more input; one iteration stops far from convergence
        lambda f: {"merge_method": "karcher", "base_model": str(f.base), "models": _models(f.models[:2]), "parameters": {"max_iter": 1}},
        lambda b, xs: ref_karcher([b, *xs[:2]], 1),
    ),
}


def _merge(plan: dict, out: Path, **kw) -> dict[str, Tensor]:
    streammerge.merge(plan, out, quiet=True, **kw)
    return load_output(out)


def _max_error(out: dict[str, Tensor], family: Family, reference: Reference) -> dict[str, float]:
    t = family.tensors
    assert set(out) == set(t[family.base])
    errors = {}
    for name, got in out.items():
        assert got.dtype == torch.float32, name
        want = reference(t[family.base][name], [t[m][name] for m in family.models])
        errors[name] = (got.double() - want).abs().max().item()
    return errors


@pytest.mark.parametrize("case", list(CASES))
def test_fp32_matches_reference(case: str, fp32_family: Family, tmp_path: Path) -> None:
    plan, reference = CASES[case]
    errors = _max_error(_merge(plan(fp32_family), tmp_path / "out"), fp32_family, reference)
    assert max(errors.values()) <= 1e-6, max(errors.items(), key=lambda e: e[1])


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_inputs_computed_in_fp32_match_reference(case: str, bf16_family: Family, tmp_path: Path) -> None:
    plan, reference = CASES[case]
    out = _merge(plan(bf16_family) | {"out_dtype": "float32"}, tmp_path / "out", compute_dtype="float32")
    errors = _max_error(out, bf16_family, reference)
    assert max(errors.values()) <= 1e-6, max(errors.items(), key=lambda e: e[1])


@pytest.mark.parametrize("case", list(CASES))
def test_chunking_changes_no_byte(case: str, fp32_family: Family, tmp_path: Path) -> None:
    """Chunks of one 32-wide row (8 elements of a norm vector), 7 rows, and whole tensors; computed
    and written in float64, where a statistic off in its last bit would show."""
    plan = CASES[case][0](fp32_family) | {"compute_dtype": "float64", "out_dtype": "float64"}
    first, *others = merge_with_chunk_sizes(plan, tmp_path, (8, 7 * 32, 10**9))
    assert all(o == first for o in others)


@pytest.mark.parametrize("case", list(CASES))
def test_auto_chunking_changes_no_byte(case: str, bf16_family: Family, tmp_path: Path) -> None:
    """compute_dtype auto on bf16 inputs: mergekit's steps in bf16, whose whole-tensor norms and dot
    products are statistics passes over the chunks, give the same bytes for every chunk size. (karcher
    takes 2 + 3·max_iter passes, each replaying the iteration so far on every chunk: 4 iterations
    here rather than 25.)"""
    plan = CASES[case][0](bf16_family)
    if case == "karcher":
        plan["parameters"] = {**plan["parameters"], "max_iter": 4}
    first, *others = merge_with_chunk_sizes(plan, tmp_path, (8, 7 * 32, 10**9))
    assert all(o == first for o in others)


def test_nuslerp_zero_weight_sum_interpolates_halfway(fp32_family: Family, tmp_path: Path) -> None:
    def run(ws: list[float], sub: str) -> bytes:
        streammerge.merge({"merge_method": "nuslerp", "models": _models(fp32_family.models[:2], ws)}, tmp_path / sub, quiet=True)
        return (tmp_path / sub / "model.safetensors").read_bytes()

    assert run([1.0, -1.0], "a") == run([0.5, 0.5], "b")


def test_karcher_ignores_weights(fp32_family: Family, tmp_path: Path) -> None:
    def run(ws: list[float] | None, sub: str) -> bytes:
        streammerge.merge({"merge_method": "karcher", "models": _models(fp32_family.models, ws)}, tmp_path / sub, quiet=True)
        return (tmp_path / sub / "model.safetensors").read_bytes()

    assert run([0.9, 0.05, 0.05], "a") == run(None, "b")


@pytest.mark.parametrize("method", ["multislerp", "karcher"])
def test_single_model_is_returned_unchanged(method: str, fp32_family: Family, tmp_path: Path) -> None:
    out = _merge({"merge_method": method, "models": _models(fp32_family.models[:1], [0.5])}, tmp_path / "out")
    for name, got in out.items():
        assert torch.equal(got, fp32_family.tensors[fp32_family.models[0]][name]), name


def _opposed(fp32_family: Family, root: Path, scales: list[float]) -> list[Path]:
    """Checkpoints that are the family's base times each scale: all on one line through 0."""
    base = fp32_family.tensors[fp32_family.base]
    return [write_checkpoint(root / f"m{i}", {k: s * v for k, v in base.items()}, Arch().config(torch.float32))
            for i, s in enumerate(scales)]


def test_multislerp_opposite_pair_falls_back_to_weighted_sum(fp32_family: Family, tmp_path: Path) -> None:
    models = _opposed(fp32_family, tmp_path, [1.0, -2.0])  # unit vectors u, -u: their equal-weight mean is 0
    out = _merge({"merge_method": "multislerp", "models": _models(models, [1.0, 1.0])}, tmp_path / "out")
    for name, got in out.items():
        assert torch.allclose(got.double(), -0.5 * fp32_family.tensors[fp32_family.base][name].double(), atol=1e-6), name


def test_multislerp_balanced_opposite_directions_fail(fp32_family: Family, tmp_path: Path) -> None:
    models = _opposed(fp32_family, tmp_path, [1.0, -1.0, 3.0])  # unit vectors u, -u, u weighted 1, 2, 1
    # float64 statistics see the zero mean; under compute_dtype auto, mergekit's float32 steps leave
    # a mean of rounding noise (norm 1e-8 .. 5e-8 > eps here), whose direction mergekit and
    # streammerge write
    plan = {"merge_method": "multislerp", "models": _models(models, [1.0, 2.0, 1.0]),
            "compute_dtype": "float64"}
    with pytest.raises(PlanError, match="mean of the unit vectors .* is zero"):
        streammerge.merge(plan, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("plan", "message"), [
    (lambda f: {"merge_method": "nuslerp", "models": _models(f.models, [1, 1, 1])}, "at most 2 models"),
    (lambda f: {"merge_method": "nuslerp", "base_model": str(f.models[0]), "models": _models(f.models[:2], [1, 1])},
     "at least 2 model"),
    (lambda f: {"merge_method": "nuslerp", "models": _models(f.models[:2], [1, 1]),
                "parameters": {"nuslerp_flatten": 2}},

     "true or false"),
    (lambda f: {"merge_method": "multislerp", "models": _models(f.models[:2], [1, -1])}, "sum to 0"),
    (lambda f: {"merge_method": "multislerp", "models": _models(f.models[:2], [1, 1]), "parameters": {"eps": -1e-8}},
     "eps"),
    (lambda f: {"merge_method": "karcher", "models": _models(f.models), "parameters": {"tol": -1e-5}}, "tol"),
    (lambda f: {"merge_method": "karcher", "models": _models(f.models), "parameters": {"max_iter": 2.5}}, "integer"),
])
def test_errors(plan: Callable[[Family], dict], message: str, fp32_family: Family, tmp_path: Path) -> None:
    with pytest.raises(PlanError, match=message):
        streammerge.merge(plan(fp32_family), tmp_path / "out", quiet=True)


@pytest.mark.parametrize("loaded, compute", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                             (torch.float32, torch.bfloat16), (torch.float64, torch.float32),
                                             (torch.bfloat16, torch.float64), (torch.float32, None)])
def test_slerp_dots_from_loaded_inputs_equal_those_of_the_widened_copies(loaded: torch.dtype,
                                                                         compute: torch.dtype | None) -> None:
    """The dot pass widens the inputs as loaded where that is exact, and the compute copies where not."""
    from streammerge.methods.base import Chunk, TensorParams
    from streammerge.methods.slerp import collect_dots

    g = torch.Generator().manual_seed(5)
    v0, v1 = ((torch.randn(6, 50, generator=g, dtype=torch.float64) * 1e-2 + 1e-4).to(loaded)
              for _ in range(2))
    chunk = Chunk("w", (10, 50), v0, [v1], TensorParams({"t": 0.3}, ({},)), 2, 8, 0, (0,),
                  compute_dtype=compute)
    got = collect_dots(chunk, {})
    w0, w1 = (x.to(torch.float64) for x in (chunk.base, chunk.models[0]))  # the dtype the merge sees
    want = {"dot": (w0 * w1).sum(1), "n0": (w0 * w0).sum(1), "n1": (w1 * w1).sum(1)}
    for key, rows in want.items():
        assert torch.equal(got[key][2:8], rows) and not got[key][:2].any() and not got[key][8:].any()
