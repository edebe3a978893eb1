"""Sequential folding: models merged one after another into a running result."""

from __future__ import annotations

import torch

from streammerge.methods.base import Chunk, MergeMethod, Param, Stats
from streammerge.methods.registry import register


def sequential_merge(chunk: Chunk, stats: Stats) -> torch.Tensor:
    """r ← (1 − w_i)·r + w_i·x_i for each model in plan order, starting from the base (or, without
    one, from the first model, whose weight is then unused). An exponential moving average of
    models, as notebook merge scripts fold checkpoints one by one (cf. model soups, arXiv 2203.05482).
    """
    weights = chunk.params.per_model("weight")
    models = chunk.models
    if chunk.base is None:
        result, models, weights = models[0], models[1:], weights[1:]
    else:
        result = chunk.base
    for w, x in zip(weights, models):
        result = torch.lerp(result, x, w)
    return result


register(
    MergeMethod(
        name="sequential",
        merge=sequential_merge,
        params=(Param("weight", float, required=True, per_model=True, low=0.0, high=1.0,
                      doc="how far the running result moves towards this model"),),
        base="optional",
        precision="float32",
        paper="arXiv:2203.05482",
        min_models=0,  # r is the base, with nothing folded into it
    )
)
