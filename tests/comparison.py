"""Comparing a merge with mergekit's output: elements off by more than one rounding, the
statistics random methods are compared by, and mergekit's sce replayed with either tie order."""

from __future__ import annotations

import math

import pytest
import torch

ULP_BITS = {torch.bfloat16: 7, torch.float16: 10}


def differing_masks(got: dict[str, torch.Tensor], gold: dict[str, torch.Tensor],
                    exact: bool = False) -> dict[str, torch.Tensor]:
    """Per tensor, where the output differs from the golden: any bit for half precision (with
    ``exact``; else by more than one ulp, with a 1e-6 floor for results that cancel to ~0), by more
    than 1e-6 for float32."""
    out = {}
    for name, g in gold.items():
        c = got[name]
        assert c.shape == g.shape and c.dtype == g.dtype, (name, c.shape, g.shape, c.dtype, g.dtype)
        if g.dtype in ULP_BITS and exact:
            out[name] = c.view(torch.int16) != g.view(torch.int16)
        elif g.dtype in ULP_BITS:
            exponent = torch.floor(torch.log2(g.double().abs().clamp_min(1e-30)))
            ulp = torch.exp2(exponent - ULP_BITS[g.dtype]).clamp_min(1e-6)
            out[name] = (c.double() - g.double()).abs() > ulp
        else:
            out[name] = (c.double() - g.double()).abs() > 1e-6
    return out


def differing(got: dict[str, torch.Tensor], gold: dict[str, torch.Tensor], exact: bool = False) -> int:
    """How many elements ``differing_masks`` marks."""
    return sum(int(m.sum()) for m in differing_masks(got, gold, exact).values())


def task_vector(tensors: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> torch.Tensor:
    names = [n for n in sorted(base) if n in tensors]
    return torch.cat([(tensors[n].double() - base[n].double()).reshape(-1) for n in names])


def statistics(got: dict[str, torch.Tensor], gold: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
               seed_cos: float) -> None:
    """A random merge against mergekit's draw: kept fraction within 0.01 (or three standard
    deviations of the difference of two independent draws' fractions, on small models),
    ‖task vector‖ within 2 %, cosine with mergekit's draw within 0.03 of ``seed_cos`` (the cosine
    two of mergekit's seeds give)."""
    tv, tg = task_vector(got, base), task_vector(gold, base)
    kept = (tg != 0).double().mean().item()
    spread = 3 * math.sqrt(2 * kept * (1 - kept) / tg.numel())
    assert abs((tv != 0).double().mean().item() - kept) < max(0.01, spread)
    assert tv.norm().item() == pytest.approx(tg.norm().item(), rel=0.02)
    cos = (tv @ tg / (tv.norm() * tg.norm())).item()
    assert abs(cos - seed_cos) < 0.03, cos


def sce_replay(base: torch.Tensor, deltas: list[torch.Tensor], select_topk: float,
               lowest_first: bool) -> torch.Tensor:
    """mergekit 0.1.5's sce on one tensor, step by step in the inputs' dtype, with the equal
    variances at its top-k cut taken in torch.topk's order or lowest flat index first. (sce's model
    weights depend on the selection, so a tie order can move every element of the tensor.)"""
    tvs = torch.stack(deltas)
    var = torch.var(tvs, dim=0, unbiased=False).reshape(-1)
    k = int(torch.count_nonzero(var) * select_topk)
    if lowest_first:  # a stable descending sort keeps equal values in index order
        chosen = torch.sort(var.abs(), descending=True, stable=True).indices[:k]
    else:
        chosen = torch.topk(var.abs(), k=k, largest=True).indices
    mask = torch.zeros_like(var)
    mask[chosen] = 1
    tvs = tvs * mask.reshape(base.shape)
    agree = tvs.sign() == (tvs.sum(dim=0) >= 0).to(base.dtype) * 2 - 1
    weights = tvs.square().reshape(len(tvs), -1).mean(dim=1)
    total = torch.sum(weights).item()
    weights = torch.ones_like(weights) / len(weights) if abs(total) < 1e-6 else weights / total
    weights = weights.view(-1, *[1] * base.dim())
    erased = weights * agree
    return base + (tvs * erased).sum(dim=0) / torch.sum(erased, dim=0).clamp(min=1e-6)
