"""SLERP between two models with an explicit lerp threshold, and optionally directions and norms
interpolated apart (the slerp of notebook merge tools' ``merge_config``).

v0 = base_model (t = 0), v1 the other model, each tensor one flattened vector; θ = the
angle between them (cos θ = ⟨v0, v1⟩ / ‖v0‖‖v1‖, in float64), ε = ``epsilon``:

    a = sin((1−t)θ)/sin θ,  b = sin(tθ)/sin θ     (a = 1−t, b = t when sin θ < ε)
    out = a·v0 + b·v1                                                  normalize: false
    out = ((1−t)‖v0‖ + t‖v1‖) · (a·v0/‖v0‖ + b·v1/‖v1‖)                normalize: true

and out = (1−t)·v0 + t·v1 in both when ‖v0‖ < ε or ‖v1‖ < ε. With ``normalize`` the unit
directions are slerped (a unit vector) and the norm is interpolated linearly, so the output's
norm is exactly (1−t)‖v0‖ + t‖v1‖ (without it, two vectors of different norms give a norm
between them that is not linear in t).
"""

from __future__ import annotations

import math

import torch

from streammerge.methods.base import Chunk, MergeMethod, Param, StatPass, Stats
from streammerge.methods.registry import register
from streammerge.methods.slerp import collect_dots, slerp_merge


def _finish(totals: dict[str, torch.Tensor], chunk: Chunk, stats: Stats) -> Stats:
    g = chunk.params.globals
    t, eps = g["t"], g["epsilon"]
    n0, n1 = math.sqrt(totals["n0"].sum()), math.sqrt(totals["n1"].sum())
    if n0 < eps or n1 < eps:  # no direction to interpolate
        return {"s0": 1 - t, "s1": t}
    theta = math.acos(min(1.0, max(-1.0, float(totals["dot"].sum()) / (n0 * n1))))
    if math.sin(theta) < eps:
        a, b = 1 - t, t
    else:
        a, b = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    if not g["normalize"]:
        return {"s0": a, "s1": b}
    norm = (1 - t) * n0 + t * n1
    return {"s0": norm * a / n0, "s1": norm * b / n1}


register(
    MergeMethod(
        name="slerp_eps",
        merge=slerp_merge,
        params=(
            Param("t", float, required=True, low=0.0, high=1.0,
                  doc="interpolation factor: 0 = base_model, 1 = the other"),
            Param("epsilon", float, default=1e-8, low=0.0, doc="lerp when sin θ or a norm is below it"),
            Param("normalize", bool, default=False, doc="interpolate directions and norms separately"),
        ),
        base="required",
        precision="float32",
        paper="doi:10.1145/325165.325242",
        passes=(StatPass(collect_dots, _finish),),
        models_exactly=2,
        doc="slerp with a lerp threshold ε; normalize: directions slerped, norms lerped",
    )
)
