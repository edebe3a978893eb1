"""Weighted average of whole models."""

from __future__ import annotations

import torch

from streammerge.methods import compiled
from streammerge.methods.base import Chunk, MergeMethod, Param, Stats
from streammerge.methods.registry import register


def linear_merge(chunk: Chunk, stats: Stats) -> torch.Tensor:
    """out = Σ w_i x_i, divided by Σ w_i when ``normalize`` (default true).

    Model soups: Wortsman et al., "Model soups", ICML 2022 (arXiv 2203.05482).
    """
    # the same bits from the inputs as loaded, with no widened copies of them
    if compiled.computes_float32(chunk, chunk.loaded_models):
        weights, normalize = chunk.params.per_model("weight"), chunk.params.globals["normalize"]
        out = compiled.linear(chunk.loaded_models, weights, normalize)
        if out is not None:
            return out
    first = chunk.models[0]
    weights = torch.tensor(chunk.params.per_model("weight"), dtype=first.dtype, device=first.device)
    if chunk.wide:
        out = torch.stack(chunk.models).mul_(weights.view(-1, *[1] * first.dim())).sum(0)
        return out / sum(chunk.params.per_model("weight")) if chunk.params.globals["normalize"] else out
    out = torch.zeros_like(first)
    for x, w in zip(chunk.models, weights):  # mergekit's order: accumulate w_i·x_i, then divide by Σ w_i
        out.addcmul_(x, w)
    if chunk.params.globals["normalize"]:
        out.div_(weights.sum())
    return out


register(
    MergeMethod(
        name="linear",
        merge=linear_merge,
        params=(
            Param("weight", float, required=True, per_model=True, doc="the model's weight"),
            Param("normalize", bool, default=True, doc="divide by the sum of the weights"),
        ),
        base="model",
        precision="float32",
        paper="arXiv:2203.05482",
    )
)
