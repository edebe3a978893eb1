"""Every method, end to end through the engine, against the float64 whole-tensor references."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import references as ref
import streammerge
from checkpoint_builder import Family
from conftest import load_output

W = [0.8, 0.3, 0.6]
D = [0.4, 0.5, 0.7]


def _models(family: Family, ws: list[float], ds: list[float] | None = None) -> list[dict]:
    out = []
    for i, path in enumerate(family.models):
        params = {"weight": ws[i]} | ({"density": ds[i]} if ds else {})
        out.append({"model": str(path), "parameters": params})
    return out


def _merge(tmp_path: Path, plan: dict, **kw) -> dict[str, torch.Tensor]:
    out = tmp_path / "out"
    streammerge.merge(plan, out, quiet=True, **kw)
    return load_output(out)


# (method, extra plan keys, reference(base, models, name) -> float64 tensor)
CASES = {
    "linear": (
        lambda f: {"merge_method": "linear", "models": _models(f, W)},
        lambda b, xs, name: ref.linear(xs, W),
    ),
    "linear_unnormalized": (
        lambda f: {"merge_method": "linear", "models": _models(f, W), "parameters": {"normalize": False}},
        lambda b, xs, name: ref.linear(xs, W, normalize=False),
    ),
    "task_arithmetic": (
        lambda f: {"merge_method": "task_arithmetic", "base_model": str(f.base), "models": _models(f, [0.5, 1.2, -0.4]),
                   "parameters": {"lambda": 0.8}},
        lambda b, xs, name: ref.task_family(b, xs, [0.5, 1.2, -0.4], lam=0.8),
    ),
    "ties": (
        lambda f: {"merge_method": "ties", "base_model": str(f.base), "models": _models(f, W, D)},
        lambda b, xs, name: ref.task_family(b, xs, W, sparsify="magnitude", densities=D, consensus=True, normalize=True),
    ),
    "ties_unnormalized_lambda": (
        lambda f: {"merge_method": "ties", "base_model": str(f.base), "models": _models(f, W, D),
                   "parameters": {"normalize": False, "lambda": 0.7}},
        lambda b, xs, name: ref.task_family(b, xs, W, sparsify="magnitude", densities=D, consensus=True, lam=0.7),
    ),
    "dare_ties": (
        lambda f: {"merge_method": "dare_ties", "base_model": str(f.base), "models": _models(f, W, D), "seed": 7},
        lambda b, xs, name: ref.task_family(b, xs, W, sparsify="random", densities=D, consensus=True, seed=7, name=name, model_ids=[0, 1, 2]),
    ),
    "dare_linear_no_rescale": (
        lambda f: {"merge_method": "dare_linear", "base_model": str(f.base), "models": _models(f, W, D), "seed": 3,
                   "parameters": {"rescale": False, "normalize": True}},
        lambda b, xs, name: ref.task_family(b, xs, W, sparsify="random", densities=D, rescale=False, normalize=True, seed=3,
                                            name=name, model_ids=[0, 1, 2]),
    ),
    "slerp": (
        lambda f: {"merge_method": "slerp", "base_model": str(f.models[1]), "models": [{"model": str(f.models[1])}, {"model": str(f.models[2])}],
                   "parameters": {"t": 0.65}},
        None,
    ),
}


def _reference(case: str, family: Family, name: str) -> torch.Tensor:
    t = family.tensors
    if case == "slerp":
        return ref.slerp(t[family.models[1]][name], t[family.models[2]][name], 0.65)
    return CASES[case][1](t[family.base][name], [t[m][name] for m in family.models], name)


@pytest.mark.parametrize("case", list(CASES))
def test_fp32_matches_reference(case: str, fp32_family: Family, tmp_path: Path) -> None:
    out = _merge(tmp_path, CASES[case][0](fp32_family))
    assert set(out) == set(fp32_family.tensors[fp32_family.base])
    for name, got in out.items():
        assert got.dtype == torch.float32, name
        err = (got.double() - _reference(case, fp32_family, name)).abs().max().item()
        assert err <= 1e-6, (name, err)


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_rounds_once_to_the_reference(case: str, bf16_family: Family, tmp_path: Path) -> None:
    """bf16 inputs, computed wide: every element is the reference rounded to bf16, except where the
    reference sits on a rounding midpoint (round-half-to-even may go either way by 1 ulp)."""
    out = _merge(tmp_path, CASES[case][0](bf16_family), compute_dtype="float64")
    for name, got in out.items():
        assert got.dtype == torch.bfloat16, name
        want = _reference(case, bf16_family, name)
        diff = got != want.to(torch.bfloat16)
        if diff.any():
            w, g = want[diff], got[diff].double()
            ulp = torch.exp2(torch.floor(torch.log2(w.abs())) - 7)
            assert ((w - g).abs() <= ulp).all(), name
            mid_distance = ((w.abs() / ulp) % 1 - 0.5).abs()
            assert (mid_distance < 1e-6).all(), (name, mid_distance.max().item())


def test_ties_keeps_exactly_k_per_task_vector(fp32_family: Family, tmp_path: Path) -> None:
    """With one model and weight 1, TIES output − base is that model's trimmed task vector."""
    plan = {"merge_method": "ties", "base_model": str(fp32_family.base),
            "models": [{"model": str(fp32_family.models[0]), "parameters": {"weight": 1.0, "density": 0.3}}]}
    out = _merge(tmp_path, plan)
    for name, got in out.items():
        kept = int(((got.double() - fp32_family.tensors[fp32_family.base][name].double()) != 0).sum())
        delta = fp32_family.tensors[fp32_family.models[0]][name] - fp32_family.tensors[fp32_family.base][name]
        nonzero = int((delta != 0).sum())
        assert kept == min(max(1, int(0.3 * got.numel())), nonzero), name


def test_dare_kept_fraction_and_l1_norm(fp32_family: Family, tmp_path: Path) -> None:
    """One model, weight 1: DARE keeps ~density of the entries and rescale preserves the L1 norm."""
    plan = {"merge_method": "dare_linear", "base_model": str(fp32_family.base), "seed": 11,
            "models": [{"model": str(fp32_family.models[0]), "parameters": {"weight": 1.0, "density": 0.4}}]}
    out = _merge(tmp_path, plan)
    kept = total = 0
    for name, got in out.items():
        base = fp32_family.tensors[fp32_family.base][name].double()
        delta = fp32_family.tensors[fp32_family.models[0]][name].double() - base
        tv = got.double() - base
        kept += int(((tv != 0) & (delta != 0)).sum())
        total += int((delta != 0).sum())
        assert tv.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-5), name
    sigma = (0.4 * 0.6 / total) ** 0.5
    assert abs(kept / total - 0.4) < 3 * sigma


def test_dare_seed_controls_the_mask(fp32_family: Family, tmp_path: Path) -> None:
    def run(seed: int, sub: str) -> bytes:
        plan = {"merge_method": "dare_ties", "base_model": str(fp32_family.base), "models": _models(fp32_family, W, D), "seed": seed}
        streammerge.merge(plan, tmp_path / sub, quiet=True)
        return (tmp_path / sub / "model.safetensors").read_bytes()

    assert run(5, "a") == run(5, "b")
    assert run(5, "a2") != run(6, "c")


def test_sequential_folds_models_in_order(fp32_family: Family, tmp_path: Path) -> None:
    t = fp32_family.tensors
    ws = [0.5, 0.25, 0.75]
    with_base = {"merge_method": "sequential", "base_model": str(fp32_family.base), "models": _models(fp32_family, ws)}
    without = {"merge_method": "sequential", "models": _models(fp32_family, ws)}
    out_a = _merge(tmp_path / "a", with_base)
    out_b = _merge(tmp_path / "b", without)
    for name in out_a:
        r = t[fp32_family.base][name].double()
        for w, m in zip(ws, fp32_family.models):
            r = (1 - w) * r + w * t[m][name].double()
        assert (out_a[name].double() - r).abs().max() <= 1e-6, name
        r = t[fp32_family.models[0]][name].double()
        for w, m in zip(ws[1:], fp32_family.models[1:]):
            r = (1 - w) * r + w * t[m][name].double()
        assert (out_b[name].double() - r).abs().max() <= 1e-6, name


def test_ties_rescale_keeps_each_task_vector_l1_norm(fp32_family: Family, tmp_path: Path) -> None:
    """mergekit's `rescale` on ties: the trimmed task vector is scaled back to ‖δ‖₁."""
    base, model = fp32_family.base, fp32_family.models[0]
    plan = {"merge_method": "ties", "base_model": str(base), "parameters": {"rescale": True},
            "models": [{"model": str(model), "parameters": {"weight": 1.0, "density": 0.3}}]}
    out = _merge(tmp_path, plan)
    for name, got in out.items():
        b = fp32_family.tensors[base][name].double()
        delta = fp32_family.tensors[model][name].double() - b
        trimmed = ref.task_family(b, [fp32_family.tensors[model][name]], [1.0], sparsify="magnitude", densities=[0.3]) - b
        want = b + trimmed * (delta.abs().sum() / trimmed.abs().sum())
        assert (got.double() - want).abs().max() <= 1e-6, name
