"""model_stock, sce, ram, ramplus_tl, nearswap, arcee_fusion, end to end through the engine, against
straightforward whole-tensor references written here (float64; arcee_fusion in mergekit's float32
order of operations, which decides which elements cross its threshold)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

import streammerge
from checkpoint_builder import Arch, Family, write_checkpoint
from conftest import load_output, merge_with_chunk_sizes
from streammerge.errors import PlanError

Tensors = list[torch.Tensor]


def model_stock(b: torch.Tensor, xs: Tensors, filter_wise: bool = False) -> torch.Tensor:
    b = b.double()
    xs = [x.double() for x in xs]
    rows = filter_wise and b.dim() >= 2
    d = [(x - b) if rows else (x - b).reshape(-1) for x in xs]
    cos = torch.stack([(u * v).sum(-1) / (u.norm(dim=-1) * v.norm(dim=-1)) for u, v in itertools.combinations(d, 2)]).mean(0)
    n = len(xs)
    t = n * cos / (1 + (n - 1) * cos)
    if rows:
        t = t.unsqueeze(-1)
    return t * sum(xs) / n + (1 - t) * b


def sce(b: torch.Tensor, xs: Tensors, select_topk: float = 1.0) -> torch.Tensor:
    b = b.double()
    tv = torch.stack([x.double() - b for x in xs])
    if select_topk < 1:
        var = ((tv - tv.mean(0)) ** 2).mean(0).reshape(-1)
        k = int(select_topk * int((var != 0).sum()))
        keep = torch.zeros(var.numel(), dtype=torch.bool)
        keep[torch.sort(-var, stable=True).indices[:k]] = True  # equal variances: lowest index first
        tv = tv * keep.reshape(b.shape)
    w = torch.stack([(t**2).mean() for t in tv])
    w = w / w.sum() if w.sum() >= 1e-6 else torch.full_like(w, 1 / len(xs))
    elected = torch.where(tv.sum(0) >= 0, 1.0, -1.0).double()
    weights = w.view(-1, *[1] * b.dim()) * (torch.sign(tv) == elected)
    return b + (weights * tv).sum(0) / weights.sum(0).clamp(min=1e-6)


def ram(b: torch.Tensor, xs: Tensors, epsilon: float = 1e-5, r: float | None = None, alpha: float = 0.0) -> torch.Tensor:
    b = b.double()
    tv = torch.stack([x.double() - b for x in xs])
    active = tv.abs() > epsilon
    c = active.sum(0)
    unique, shared = active & (c == 1), active & (c > 1)
    scale = [1.0] * len(xs)
    if r is not None:  # RAM+: per-model shared/unique counts over the whole tensor
        scale = [1 + r * min(int(s.sum()) / max(int(u.sum()), epsilon), alpha) for s, u in zip(shared, unique)]
    out = b.clone()
    for i in range(len(xs)):
        out += tv[i] * (unique[i] * scale[i] + shared[i] / c.clamp(min=1))
    return out


def nearswap(b: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
    b, x = b.double(), x.double()
    w = (t / (b - x).abs().clamp(min=1e-6)).clamp(0, 1)
    return w * x + (1 - w) * b


def arcee_fusion(b: torch.Tensor, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """mergekit's operations, in ``dtype``: quantiles are sorted values at index int(q·(n − 1))."""
    b, x = b.to(dtype), x.to(dtype)
    p = F.softmax(x, dim=-1) + 1e-8
    q = F.softmax(b, dim=-1) + 1e-8
    importance = (x - b).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    s = torch.sort(importance.reshape(-1)).values
    q1, median, q3 = (s[int(f * (s.numel() - 1))] for f in (0.25, 0.5, 0.75))
    return b + (x - b) * (importance >= median + 1.5 * (q3 - q1)).to(dtype)


def _plan(method: str, base: Path, models: list[Path], **params: object) -> dict:
    return {"merge_method": method, "base_model": str(base), "models": [{"model": str(m)} for m in models], "parameters": params}


Reference = Callable[[torch.Tensor, Tensors, torch.dtype], torch.Tensor]

# case -> (plan for a family, reference(base, models, float dtype of the computation))
CASES: dict[str, tuple[Callable[[Family], dict], Reference]] = {
    "model_stock": (lambda f: _plan("model_stock", f.base, f.models), lambda b, xs, dt: model_stock(b, xs)),
    "model_stock_two": (lambda f: _plan("model_stock", f.base, f.models[:2]), lambda b, xs, dt: model_stock(b, xs[:2])),
    "model_stock_filter_wise": (lambda f: _plan("model_stock", f.base, f.models, filter_wise=True),
                                lambda b, xs, dt: model_stock(b, xs, filter_wise=True)),
    "sce": (lambda f: _plan("sce", f.base, f.models), lambda b, xs, dt: sce(b, xs)),
    "sce_select_topk": (lambda f: _plan("sce", f.base, f.models, select_topk=0.4), lambda b, xs, dt: sce(b, xs, 0.4)),
    "ram": (lambda f: _plan("ram", f.base, f.models), lambda b, xs, dt: ram(b, xs)),
    "ram_epsilon": (lambda f: _plan("ram", f.base, f.models, epsilon=5e-4), lambda b, xs, dt: ram(b, xs, 5e-4)),
    "ramplus_tl": (lambda f: _plan("ramplus_tl", f.base, f.models), lambda b, xs, dt: ram(b, xs, r=0.1, alpha=0.2)),
    "ramplus_tl_params": (lambda f: _plan("ramplus_tl", f.base, f.models, r=0.3, alpha=0.5, epsilon=5e-4),
                          lambda b, xs, dt: ram(b, xs, 5e-4, r=0.3, alpha=0.5)),
    "nearswap": (lambda f: _plan("nearswap", f.base, f.models[1:2], t=5e-4), lambda b, xs, dt: nearswap(b, xs[1], 5e-4)),
    "arcee_fusion": (lambda f: _plan("arcee_fusion", f.base, f.models[2:]), lambda b, xs, dt: arcee_fusion(b, xs[2], dt)),
}


def _check(family: Family, case: str, out: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    t = family.tensors
    assert set(out) == set(t[family.base])
    for name, got in out.items():
        assert got.dtype == torch.float32, name
        want = CASES[case][1](t[family.base][name], [t[m][name] for m in family.models], dtype)
        err = (got.double() - want.double()).abs().max().item()
        assert err <= 1e-6, (name, err)


@pytest.mark.parametrize("case", list(CASES))
def test_fp32_matches_reference(case: str, fp32_family: Family, tmp_path: Path) -> None:
    streammerge.merge(CASES[case][0](fp32_family), tmp_path / "out", quiet=True)
    _check(fp32_family, case, load_output(tmp_path / "out"), torch.float32)


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_inputs_computed_wide_match_reference(case: str, bf16_family: Family, tmp_path: Path) -> None:
    """bf16 inputs (many equal task-vector entries: ties at sce's variance cut), computed in float64."""
    plan = CASES[case][0](bf16_family) | {"out_dtype": "float32"}
    streammerge.merge(plan, tmp_path / "out", quiet=True, compute_dtype="float64")
    _check(bf16_family, case, load_output(tmp_path / "out"), torch.float64)


@pytest.mark.parametrize("case", list(CASES))
def test_chunking_changes_no_byte(case: str, fp32_family: Family, tmp_path: Path) -> None:
    first, *rest = merge_with_chunk_sizes(CASES[case][0](fp32_family), tmp_path)
    assert all(r == first for r in rest)


@pytest.mark.parametrize("compute_dtype", ["auto", "float64"])
def test_model_stock_opposite_task_vectors_keep_the_base(compute_dtype: str, fp32_family: Family,
                                                         tmp_path: Path) -> None:
    """Two task vectors δ and −δ: cos = −1, so 1 + (N − 1)·cos = 0 and mergekit 0.1.5 keeps the base
    (t = 0) rather than dividing by zero."""
    base = fp32_family.tensors[fp32_family.base]
    delta = {k: fp32_family.tensors[fp32_family.models[0]][k] - v for k, v in base.items()}
    models = [write_checkpoint(tmp_path / f"m{sign}", {k: base[k] + sign * d for k, d in delta.items()},
                               Arch().config(torch.float32)) for sign in (1, -1)]
    streammerge.merge(_plan("model_stock", fp32_family.base, models), tmp_path / "out", quiet=True,
                      compute_dtype=compute_dtype)
    out = load_output(tmp_path / "out")
    assert all(torch.equal(out[k], v) for k, v in base.items())


def test_arcee_fusion_writes_the_plan_dtype(bf16_family: Family, tmp_path: Path) -> None:
    """mergekit's float32 mask upcasts its output to float32 (#604); the output keeps the plan's dtype."""
    streammerge.merge(CASES["arcee_fusion"][0](bf16_family), tmp_path / "out", quiet=True)
    assert {t.dtype for t in load_output(tmp_path / "out").values()} == {torch.bfloat16}


def test_arcee_fusion_quantiles_below_zero(tmp_path: Path) -> None:
    """Barely changed rows have a KL that rounds to either sign, so importances can be negative: q1
    of the matrix "w" is, at the scale of its median and q3; the vector "v" has a negative KL, so all
    its quantiles are, and its few smallest changes still cross the threshold. The order statistics
    must follow the signed values, not their magnitudes."""
    g = torch.Generator().manual_seed(5)
    base = {"v": 0.02 * torch.randn(40, generator=g)}
    change = torch.where(torch.arange(40) < 4, 3e-9, 1e-7 * (1 + 0.05 * torch.randn(40, generator=g)))
    model = {"v": base["v"] + change * torch.randn(40, generator=g).sign()}
    base["w"] = 0.02 * torch.randn(64, 32, generator=g)
    model["w"] = base["w"] + torch.cat([torch.full((56, 1), 1e-7), torch.full((8, 1), 1e-2)]) * torch.randn(64, 32, generator=g)
    for name in base:
        p = F.softmax(model[name], dim=-1) + 1e-8
        q = F.softmax(base[name], dim=-1) + 1e-8
        importance = (model[name] - base[name]).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
        assert torch.sort(importance.reshape(-1)).values[int(0.25 * (importance.numel() - 1))] < 0, name
        assert not torch.equal(arcee_fusion(base[name], model[name]), base[name]), name
    config = Arch().config(torch.float32)
    b, x = write_checkpoint(tmp_path / "base", base, config), write_checkpoint(tmp_path / "x", model, config)
    outputs = merge_with_chunk_sizes(_plan("arcee_fusion", b, [x]), tmp_path)
    assert all(o == outputs[0] for o in outputs)
    got = load_output(tmp_path / "chunk32")
    for name in base:
        assert torch.equal(got[name], arcee_fusion(base[name], model[name])), name


@pytest.mark.parametrize(("method", "models", "params", "message"), [
    ("model_stock", 1, {}, "model_stock needs at least 2 model"),
    ("nearswap", 2, {"t": 0.1}, "nearswap merges exactly 2 models including base_model, got 3"),
    ("arcee_fusion", 3, {}, "arcee_fusion merges exactly 2 models including base_model, got 4"),
    ("nearswap", 1, {}, "nearswap needs 't'"),
    ("nearswap", 1, {"t": -0.1}, "expected a number with 0.0 <= t"),
    ("sce", 3, {"select_topk": 1.5}, "select_topk <= 1.0"),
    ("ram", 3, {"epsilon": 0}, "0.0 < epsilon"),
    ("ramplus_tl", 3, {"alpha": -1}, "0.0 <= alpha"),
])
def test_bad_plans_fail_before_merging(method: str, models: int, params: dict, message: str, fp32_family: Family,
                                       tmp_path: Path) -> None:
    plan = _plan(method, fp32_family.base, fp32_family.models[:models], **params)
    with pytest.raises(PlanError, match=message):
        streammerge.merge(plan, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["model_stock", "sce", "ram", "ramplus_tl", "nearswap", "arcee_fusion"])
def test_base_model_is_required(method: str, fp32_family: Family, tmp_path: Path) -> None:
    plan = {"merge_method": method, "models": [{"model": str(m)} for m in fp32_family.models[:2]], "parameters": {"t": 0.1} if method == "nearswap" else {}}
    with pytest.raises(PlanError, match="needs a base_model"):
        streammerge.merge(plan, tmp_path / "out", quiet=True)
