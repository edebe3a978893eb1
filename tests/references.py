"""Straightforward float64 whole-tensor definitions of the methods, independent of the engine.

Only the DARE mask comes from ``streammerge.methods.random.Stream.uniform``: the counter-based generator
*is* the specification of which entries are dropped.
"""

from __future__ import annotations

import math

import torch

from streammerge.methods.random import Stream


def linear(xs: list[torch.Tensor], ws: list[float], normalize: bool = True) -> torch.Tensor:
    out = sum(w * x.double() for w, x in zip(ws, xs))
    return out / sum(ws) if normalize else out


def _top_k(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = max(1, int(density·n)) largest |δ|; equal magnitudes by lowest flat index."""
    if density >= 1:
        return delta
    flat = delta.reshape(-1)
    k = max(1, int(density * flat.numel()))
    order = torch.sort(-flat.abs(), stable=True).indices[:k]
    mask = torch.zeros_like(flat)
    mask[order] = 1
    return (flat * mask).reshape(delta.shape)


def _dare(delta: torch.Tensor, density: float, rescale: bool, seed: int, name: str, model_id: int) -> torch.Tensor:
    if density >= 1:
        return delta
    keep = Stream(seed, name, model_id).uniform(0, delta.numel()).reshape(delta.shape).double() < density
    kept = delta * keep
    full, part = delta.abs().sum().item(), kept.abs().sum().item()
    if rescale and full >= 1e-7 and part >= 1e-7:
        kept = kept * (full / part)
    return kept


def task_family(base: torch.Tensor, xs: list[torch.Tensor], ws: list[float], *, sparsify: str | None = None,
                densities: list[float] | None = None, consensus: bool = False, normalize: bool = False,
                lam: float = 1.0, rescale: bool = True, seed: int = 0, name: str = "", model_ids: list[int] | None = None) -> torch.Tensor:
    b = base.double()
    deltas = [x.double() - b for x in xs]
    if sparsify == "magnitude":
        deltas = [_top_k(d, p) for d, p in zip(deltas, densities)]
    elif sparsify == "random":
        deltas = [_dare(d, p, rescale, seed, name, mid) for d, p, mid in zip(deltas, densities, model_ids)]
    weighted = [w * d for w, d in zip(ws, deltas)]
    if consensus:
        total = sum(weighted)
        elected = torch.where(total >= 0, 1.0, -1.0).double()
        agree = [torch.sign(d) == elected for d in weighted]
        mixed = sum(d * a for d, a in zip(weighted, agree))
        divisor = sum(w * a.double() for w, a in zip(ws, agree))
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        mixed = sum(weighted)
        divisor = sum(ws) if abs(sum(ws)) >= 1e-8 else 1.0
    if normalize:
        mixed = mixed / divisor
    return b + lam * mixed


def slerp(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    a, b = v0.double(), v1.double()
    cos = (a * b).sum().item() / (a.norm().item() * b.norm().item())
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    theta = math.acos(cos)
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)
