"""breadcrumbs, breadcrumbs_ties, della and della_linear, end to end, against float64 whole-tensor
references of their sparsifiers; the mixing after sparsification (weights, sign election,
normalize, λ) is ``references.task_family``'s, fed with the sparsified models B + δ̂_i."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

import references as ref
import streammerge
from checkpoint_builder import Family
from conftest import load_output, merge_with_chunk_sizes
from streammerge.errors import PlanError
from streammerge.methods.random import Stream

W = [0.8, 0.3, 0.6]
D = [0.4, 0.5, 0.7]
GAMMA = [0.05, 0.1, 0.02]  # 0.02 · 32 < 1: the 32-element norms drop no outliers
EPS = [0.1, 0.2, 0.15]
D1 = [0.4, 0.5, 1.0]  # the last model keeps its whole task vector


def l1_rescaled(delta: torch.Tensor, kept: torch.Tensor, rescale: bool) -> torch.Tensor:
    """kept · ‖δ‖₁/‖kept‖₁, unless either norm is below 1e-7."""
    full, part = delta.abs().sum().item(), kept.abs().sum().item()
    return kept * (full / part) if rescale and full >= 1e-7 and part >= 1e-7 else kept


def band(delta: torch.Tensor, density: float, gamma: float, rescale: bool) -> torch.Tensor:
    """Breadcrumbs: sort |δ| (as float32, like mergekit) descending, equal values by lowest flat
    index; drop the first int(γ·n), keep the next int(density·n)."""
    if density >= 1:
        return delta
    n = delta.numel()
    target = int(density * n)
    n_top = min(int(gamma * n), n - target)
    order = torch.sort(-delta.reshape(-1).float().abs(), stable=True).indices
    mask = torch.zeros(n, dtype=torch.float64)
    mask[order[n_top : n_top + target]] = 1
    return l1_rescaled(delta, delta * mask.reshape(delta.shape), rescale)


def della(delta: torch.Tensor, density: float, eps: float, rescale: bool, seed: int, name: str, model_id: int) -> torch.Tensor:
    """DELLA: per row (dim 1; a 1-D tensor is one row), keep with p = density − ε + 2ε·r/(m−1),
    r the ascending rank of |δ| (equal values by index), u from the project's generator; then the
    tensor's L1 rescale."""
    if density >= 1:
        return delta
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    rank = rows.abs().argsort(dim=1, stable=True).argsort(dim=1).double() / (rows.shape[1] - 1)
    u = Stream(seed, name, model_id).uniform(0, delta.numel()).reshape(rows.shape)
    return l1_rescaled(delta, (rows * (u < (density - eps) + rank * 2 * eps)).reshape(delta.shape), rescale)


def _plan(method: str, per_model: dict[str, list[float]], **kw) -> Callable[[Family], dict]:
    def plan(f: Family) -> dict:
        models = [{"model": str(p), "parameters": {"weight": W[i]} | {k: v[i] for k, v in per_model.items()}} for i, p in enumerate(f.models)]
        return {"merge_method": method, "base_model": str(f.base), "models": models, **kw}

    return plan


def _mixed(b: torch.Tensor, sparse: list[torch.Tensor], **kw) -> torch.Tensor:
    """``references.task_family`` on the models B + δ̂_i (whose deltas it recovers up to float64 rounding)."""
    return ref.task_family(b, [b.double() + s for s in sparse], W, **kw)


def _bands(b: torch.Tensor, xs: list[torch.Tensor], ds: list[float] = D, gammas: list[float] = GAMMA,
           rescale: bool = False) -> list[torch.Tensor]:
    return [band(x.double() - b.double(), d, g, rescale) for x, d, g in zip(xs, ds, gammas)]


def _dellas(b: torch.Tensor, xs: list[torch.Tensor], name: str, seed: int, ds: list[float] = D,
            rescale: bool = True) -> list[torch.Tensor]:
    return [della(x.double() - b.double(), d, e, rescale, seed, name, i) for i, (x, d, e) in enumerate(zip(xs, ds, EPS))]


# (plan from a family, reference(base, models, name) -> float64 tensor)
CASES = {
    "breadcrumbs": (
        _plan("breadcrumbs", {"density": D, "gamma": GAMMA}),
        lambda b, xs, name: _mixed(b, _bands(b, xs)),
    ),
    "breadcrumbs_rescale_normalize_lambda": (
        _plan("breadcrumbs", {"density": D, "gamma": GAMMA}, parameters={"rescale": True, "normalize": True, "lambda": 0.7}),
        lambda b, xs, name: _mixed(b, _bands(b, xs, rescale=True), normalize=True, lam=0.7),
    ),
    "breadcrumbs_default_gamma": (
        _plan("breadcrumbs", {"density": D}),
        lambda b, xs, name: _mixed(b, _bands(b, xs, gammas=[0.01] * 3)),
    ),
    "breadcrumbs_ties": (
        _plan("breadcrumbs_ties", {"density": D, "gamma": GAMMA}),
        lambda b, xs, name: _mixed(b, _bands(b, xs), consensus=True),
    ),
    "breadcrumbs_ties_normalize": (
        _plan("breadcrumbs_ties", {"density": D1, "gamma": GAMMA}, parameters={"normalize": True}),
        lambda b, xs, name: _mixed(b, _bands(b, xs, ds=D1), consensus=True, normalize=True),
    ),
    "della": (
        _plan("della", {"density": D, "epsilon": EPS}, seed=7, parameters={"lambda": 0.8}),
        lambda b, xs, name: _mixed(b, _dellas(b, xs, name, 7), consensus=True, normalize=True, lam=0.8),
    ),
    "della_linear": (
        _plan("della_linear", {"density": D1, "epsilon": EPS}, seed=3),
        lambda b, xs, name: _mixed(b, _dellas(b, xs, name, 3, ds=D1)),
    ),
    "della_linear_no_rescale": (
        _plan("della_linear", {"density": D, "epsilon": EPS}, seed=3, parameters={"rescale": False, "normalize": True}),
        lambda b, xs, name: _mixed(b, _dellas(b, xs, name, 3, rescale=False), normalize=True),
    ),
}


def _merge(tmp_path: Path, plan: dict, **kw) -> dict[str, torch.Tensor]:
    streammerge.merge(plan, tmp_path / "out", quiet=True, **kw)
    return load_output(tmp_path / "out")


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(case: str, dtype: torch.dtype, fp32_family: Family, bf16_family: Family, tmp_path: Path) -> None:
    """fp32: within 1e-6 of the reference. bf16 inputs computed wide: the reference rounded once to
    bf16; where it sits on a rounding midpoint (within 1e-6 ulp) either neighbour will do."""
    family = fp32_family if dtype == torch.float32 else bf16_family
    out = _merge(tmp_path, CASES[case][0](family), compute_dtype=None if dtype == torch.float32 else "float64")
    t = family.tensors
    assert out.keys() == t[family.base].keys()
    for name, got in out.items():
        assert got.dtype == dtype, name
        want = CASES[case][1](t[family.base][name], [t[m][name] for m in family.models], name)
        if dtype == torch.float32:
            assert (got.double() - want).abs().max().item() <= 1e-6, name
        else:
            off = got != want.to(dtype)
            ulp = torch.exp2(torch.floor(torch.log2(want[off].abs())) - 7)
            assert ((got[off].double() - want[off]).abs() <= (0.5 + 1e-6) * ulp).all(), name


@pytest.mark.parametrize(("case", "sizes"), [
    ("breadcrumbs_rescale_normalize_lambda", (7 * 32, 16 * 32, 10**9)),  # matrices in chunks of 7 and 16 rows
    ("breadcrumbs_ties", (7 * 32, 16 * 32, 10**9)),
    ("della", (5, 7 * 32, 10**9)),  # also 1-D tensors in uneven 5-element chunks
    ("della_linear", (5, 7 * 32, 10**9)),
])
def test_chunking_changes_no_byte(case: str, sizes: tuple[int, ...], bf16_family: Family, tmp_path: Path) -> None:
    """bf16 inputs computed in bf16: many equal |δ|, so selection cuts and rank orders meet ties."""
    first, *rest = merge_with_chunk_sizes(CASES[case][0](bf16_family), tmp_path, sizes)
    assert all(r == first for r in rest)


def _one_model(family: Family, method: str, own: dict, **kw) -> dict:
    """One model with weight 1: the output minus the base is its sparsified task vector."""
    return {"merge_method": method, "base_model": str(family.base), **kw,
            "models": [{"model": str(family.models[0]), "parameters": {"weight": 1.0, **own}}]}


def _task_vectors(family: Family, out: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (δ, output − base), float64."""
    base = family.tensors[family.base]
    return {n: (family.tensors[family.models[0]][n].double() - base[n].double(), got.double() - base[n].double()) for n, got in out.items()}


def test_breadcrumbs_small_gamma_drops_no_outliers(fp32_family: Family, tmp_path: Path) -> None:
    """int(γ·n) = 0 drops nothing from the top (mergekit zeroes the whole task vector instead)."""
    out = _merge(tmp_path, _one_model(fp32_family, "breadcrumbs", {"density": 0.5}))
    for name, (delta, tv) in _task_vectors(fp32_family, out).items():
        n_top = int(0.01 * delta.numel())
        largest = delta.abs().reshape(-1).argmax()
        assert (tv.reshape(-1)[largest] != 0) == (n_top == 0), name
        assert int((tv != 0).sum()) == min(int(0.5 * delta.numel()), int((delta != 0).sum())), name


def test_della_keep_probability_follows_rank(fp32_family: Family, tmp_path: Path) -> None:
    """density 0.5, ε 0.3: p runs 0.2 → 0.8 with the rank of |δ| in its row. The lower and upper
    rank halves each keep Σp entries within 4σ."""
    out = _merge(tmp_path, _one_model(fp32_family, "della_linear", {"density": 0.5, "epsilon": 0.3}, seed=11,
                                      parameters={"rescale": False}))
    kept, p = [], []
    for delta, tv in _task_vectors(fp32_family, out).values():
        rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
        rank = rows.abs().argsort(dim=1, stable=True).argsort(dim=1).double() / (rows.shape[1] - 1)
        live = rows != 0
        kept.append((tv.reshape(rows.shape) != 0)[live])
        p.append((0.2 + 0.6 * rank)[live])
    kept, p = torch.cat(kept).double(), torch.cat(p)
    for half in (p < 0.5, p >= 0.5):
        sigma = (p[half] * (1 - p[half])).sum().sqrt()
        assert abs(kept[half].sum() - p[half].sum()) < 4 * sigma, (kept[half].mean(), p[half].mean())


def test_della_rescale_keeps_the_l1_norm(fp32_family: Family, tmp_path: Path) -> None:
    out = _merge(tmp_path, _one_model(fp32_family, "della_linear", {"density": 0.4, "epsilon": 0.2}, seed=5))
    for name, (delta, tv) in _task_vectors(fp32_family, out).items():
        assert (tv != 0).sum() < (delta != 0).sum(), name
        assert tv.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-5), name


def test_della_seed_controls_the_mask(fp32_family: Family, tmp_path: Path) -> None:
    def run(seed: int, sub: str) -> bytes:
        plan = {**CASES["della"][0](fp32_family), "seed": seed}
        streammerge.merge(plan, tmp_path / sub, quiet=True)
        return (tmp_path / sub / "model.safetensors").read_bytes()

    assert run(5, "a") == run(5, "b")
    assert run(5, "a2") != run(6, "c")


@pytest.mark.parametrize(("method", "own", "message"), [
    ("della", {"density": 0.1, "epsilon": 0.15}, "della needs 0 < density - epsilon and density \\+ epsilon < 1"),
    ("della_linear", {"density": 0.9, "epsilon": 0.1}, "della_linear needs 0 < density - epsilon"),
    ("della", {"density": 0.5, "epsilon": -0.1}, "epsilon"),
    ("breadcrumbs", {"density": 0.5, "gamma": 1.5}, "gamma"),
])
def test_bad_parameters_fail_with_a_plan_error(method: str, own: dict, message: str, fp32_family: Family, tmp_path: Path) -> None:
    with pytest.raises(PlanError, match=message):
        _merge(tmp_path, _one_model(fp32_family, method, own))
    assert not (tmp_path / "out").exists()
