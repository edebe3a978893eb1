"""Passthrough: one source tensor, optionally scaled — the building block of frankenmerges."""

from __future__ import annotations

import torch

from streammerge.methods.base import Chunk, MergeMethod, Param, Stats
from streammerge.methods.registry import register


def passthrough_merge(chunk: Chunk, stats: Stats) -> torch.Tensor:
    """out = scale · x. With ``slices:``, stacking layer ranges of different models (renumbered
    consecutively) builds a deeper model, e.g. SOLAR's depth up-scaling (arXiv 2312.15166)."""
    scale = chunk.params.models[0]["scale"]
    x = chunk.models[0]
    return x if scale == 1 else x * scale


register(
    MergeMethod(
        name="passthrough",
        merge=passthrough_merge,
        params=(Param("scale", float, default=1.0, per_model=True, doc="multiplies the tensor (often filtered: o_proj, down_proj)"),),
        base="model",
        precision="load",
        paper="arXiv:2312.15166",
        models_exactly=1,
    )
)
