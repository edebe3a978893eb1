"""NearSwap: take the other model's value where it is close to the base."""

from __future__ import annotations

import torch

from streammerge.methods.base import Chunk, MergeMethod, Param, Stats
from streammerge.methods.registry import register


def nearswap_merge(chunk: Chunk, stats: Stats) -> torch.Tensor:
    """w = clamp(t / max(|B − x|, 1e-6), 0, 1); out = w·x + (1 − w)·B: entries within t of the base
    move all the way to x, entries farther away move by t.

    alchemonaut, QuartetAnemoi-70B-t0.0001 (huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001).
    """
    b, x = chunk.base, chunk.models[0]
    w = (chunk.params.globals["t"] / (b - x).abs().clamp(min=1e-6)).clamp(0, 1)
    return w * x + (1 - w) * b


register(
    MergeMethod(
        name="nearswap",
        merge=nearswap_merge,
        params=(Param("t", float, required=True, low=0.0, doc="sameness threshold: |B − x| at or below it takes x"),),
        base="required",
        precision="load",
        paper="huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
        models_exactly=2,
    )
)
