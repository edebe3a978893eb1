"""Spherical linear interpolation between two models."""

from __future__ import annotations

import math

import torch

from streammerge.methods import compiled
from streammerge.methods.base import Chunk, MergeMethod, Param, StatPass, Stats
from streammerge.methods.registry import register

_FLOAT32_EXACT = (torch.bfloat16, torch.float16, torch.float32)
_PRODUCTS_BYTES = 1 << 20  # the compiled dot pass's float64 products held at once
_PARALLEL = 0.9995  # |cos| above this: plain lerp, as mergekit and the LLM-SLERP scripts do


def _exact_inputs(chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor]:
    """v0 and v1 as loaded where widening them to float64 from there gives the values the compute
    dtype holds (a float32 or narrower input in float32), else the compute dtype's copies."""
    loaded, compute = (chunk.loaded_base, chunk.loaded_models[0]), chunk.compute_dtype
    exact = compute in (None, torch.float64) or (
        compute == torch.float32 and all(x.dtype in _FLOAT32_EXACT for x in loaded))
    return loaded if exact else (chunk.base, chunk.models[0])


def collect_dots(chunk: Chunk, stats: Stats) -> dict[str, torch.Tensor]:
    """⟨v0, v1⟩, ‖v0‖² and ‖v1‖² per row in float64 (v0 the base, v1 the model), for a finish
    to add. The compiled products are summed by torch as its own are, row by row: the same bits."""
    rows = chunk.row_stop - chunk.row_start
    v0, v1 = (v.reshape(rows, -1) for v in _exact_inputs(chunk))
    if compiled.supports(v0) and v1.dtype == v0.dtype:
        # rows a few at a time, their products summed while in cache; the chunk's all at once
        # grew a 4-layer merge's peak from 0.50 to 0.64 GiB
        step = max(1, _PRODUCTS_BYTES // (24 * v0.shape[1]))
        dot, n0, n1 = torch.cat([compiled.products(v0[r:r + step], v1[r:r + step]).sum(2)
                                 for r in range(0, rows, step)], dim=1)
    else:
        v0, v1 = v0.to(torch.float64), v1.to(torch.float64)
        dot, n0, n1 = (v0 * v1).sum(1), (v0 * v0).sum(1), (v1 * v1).sum(1)
    return {"dot": chunk.per_row(dot), "n0": chunk.per_row(n0), "n1": chunk.per_row(n1)}


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
    loaded = [chunk.loaded_base, chunk.loaded_models[0]]
    if compiled.computes_float32(chunk, loaded):  # the same bits, without widened copies of the inputs
        return compiled.slerp(*loaded, stats["s0"], stats["s1"])
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
