"""task_arithmetic's native clamp: λ Σ w_i δ_i is clamped elementwise before it is added to the base."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import references as ref
import streammerge
from checkpoint_builder import Family
from conftest import load_output
from streammerge.errors import PlanError

WEIGHTS = [1.0, -0.5, 0.8]


def _plan(family: Family, **params) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(family.base), "compute_dtype": "float64",
            "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(family.models, WEIGHTS)],
            "parameters": {"lambda": 1.5, **params}}


@pytest.mark.parametrize("low, high", [(-0.004, 0.003), (None, 0.002), (-0.001, None)])
def test_clamp_bounds_the_scaled_task_vector(fp32_family: Family, tmp_path: Path, low, high) -> None:
    params = {k: v for k, v in (("clamp_min", low), ("clamp_max", high)) if v is not None}
    streammerge.merge(_plan(fp32_family, **params), tmp_path / "out", quiet=True, chunk_size=7 * 32)
    out = load_output(tmp_path / "out")
    t = fp32_family.tensors
    clamped = 0
    for name in ("model.layers.1.mlp.up_proj.weight", "model.norm.weight", "lm_head.weight"):
        b = t[fp32_family.base][name].double()
        scaled = ref.task_family(b, [t[m][name] for m in fp32_family.models], WEIGHTS, lam=1.5) - b
        want = (b + scaled.clamp(low, high)).float()
        assert torch.equal(out[name], want), name
        clamped += int((scaled != scaled.clamp(low, high)).sum())
    assert clamped > 100  # the bounds bite


def test_no_clamp_by_default(fp32_family: Family, tmp_path: Path) -> None:
    """A mergekit config never sets the clamp: the result is plain task arithmetic."""
    plan = _plan(fp32_family)
    plan.pop("compute_dtype")
    streammerge.merge(plan, tmp_path / "out", quiet=True)
    name = "model.layers.0.self_attn.q_proj.weight"
    t = fp32_family.tensors
    want = ref.task_family(t[fp32_family.base][name], [t[m][name] for m in fp32_family.models], WEIGHTS, lam=1.5)
    got = load_output(tmp_path / "out")[name].double()
    assert (got - want).abs().max() < 1e-6
    assert (got - t[fp32_family.base][name].double()).abs().max() > 0.004  # beyond every bound used above


def test_clamp_min_above_max_is_refused(fp32_family: Family, tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="clamp_min <= clamp_max"):
        streammerge.merge(_plan(fp32_family, clamp_min=0.1, clamp_max=-0.1), tmp_path / "out", quiet=True)
