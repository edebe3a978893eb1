"""Spherical linear interpolation between two models."""

from __future__ import annotations

import math

import torch

from streammerge.methods.base import Chunk, MergeMethod, Param, StatPass, Stats
from streammerge.methods.registry import register

_PARALLEL = 0.9995  # |cos| above this: plain lerp, as mergekit and the LLM-SLERP scripts do


def collect_dots(chunk: Chunk, stats: Stats) -> dict[str, torch.Tensor]:
    """⟨v0, v1⟩, ‖v0‖² and ‖v1‖² per row in float64 (v0 the base, v1 the model), for a finish to add."""
    rows = chunk.row_stop - chunk.row_start
    v0 = chunk.base.to(torch.float64).reshape(rows, -1)
    v1 = chunk.models[0].to(torch.float64).reshape(rows, -1)
    return {"dot": chunk.per_row((v0 * v1).sum(1)), "n0": chunk.per_row((v0 * v0).sum(1)), "n1": chunk.per_row((v1 * v1).sum(1))}


def _finish(totals: dict[str, torch.Tensor], chunk: Chunk, stats: Stats) -> Stats:
    t = chunk.params.globals["t"]
    n0, n1 = math.sqrt(totals["n0"].sum()), math.sqrt(totals["n1"].sum())
    dot = float(totals["dot"].sum())
    cos = dot / (n0 * n1) if n0 > 1e-8 and n1 > 1e-8 else 1.0
    if abs(cos) > _PARALLEL:
        return {"s0": 1 - t, "s1": t}
    theta = math.acos(cos)
    return {"s0": math.sin((1 - t) * theta) / math.sin(theta), "s1": math.sin(t * theta) / math.sin(theta)}


def slerp_merge(chunk: Chunk, stats: Stats) -> torch.Tensor:
    """out = sin((1−t)θ)/sin θ · v0 + sin(tθ)/sin θ · v1, θ the angle between the flattened tensors;
    lerp (1−t)·v0 + t·v1 when |cos θ| > 0.9995. v0 is ``base_model`` (t = 0).

    Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985.
    """
    return stats["s0"] * chunk.base + stats["s1"] * chunk.models[0]


register(
    MergeMethod(
        name="slerp",
        merge=slerp_merge,
        params=(Param("t", float, required=True, low=0.0, high=1.0, doc="interpolation factor: 0 = base_model, 1 = the other"),),
        base="required",
        precision="float32",
        paper="doi:10.1145/325165.325242",
        passes=(StatPass(collect_dots, _finish),),
        models_exactly=2,
    )
)
