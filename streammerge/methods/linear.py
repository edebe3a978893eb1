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
    if _compiles(chunk):  # the same bits from the inputs as loaded, with no widened copies of them
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


def _compiles(chunk: Chunk) -> bool:
    """Whether ``compiled.linear`` computes this chunk: mergekit's float32 order (not ``wide``), on
    the CPU, from inputs of one dtype and shape."""
    loaded = chunk.loaded_models
    in_float32 = (chunk.compute_dtype or loaded[0].dtype) == torch.float32
    return (not chunk.wide and in_float32 and compiled.supports(loaded[0])
            and all(x.dtype == loaded[0].dtype and x.shape == loaded[0].shape for x in loaded))


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
