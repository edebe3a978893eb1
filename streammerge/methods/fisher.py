"""Fisher merging: each parameter averaged with weights from the models' Fisher information.

Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022 (arXiv:2111.09832).
With F_i model i's diagonal empirical Fisher (``fisher`` statistics: the weight's shape), elementwise:

    θ* = Σ_i w_i (F̂_i + floor) θ_i / Σ_i w_i (F̂_i + floor)

F̂_i = F_i, or F_i / ‖F_i‖₂ with the norm over all of model i's Fisher (``normalize_fisher``,
computed once a model); ``fisher_floor`` (default 1e-6, as in MergeLM and FusionBench) keeps
parameters no window moved from dividing by zero. A tensor without Fisher statistics is the
w-weighted average.
"""

from __future__ import annotations

import torch

from streammerge.methods.base import (Chunk, MergeMethod, Param, Statistics, Stats, TensorParams,
                                      TensorStatistics)
from streammerge.methods.regmean import weighted_average
from streammerge.methods.registry import register


def _prepare(params: TensorParams, stats: TensorStatistics) -> tuple[dict[str, float], ...]:
    """Per model, the whole model's ‖F_i‖₂ when normalizing."""
    if not params.globals["normalize_fisher"]:
        return tuple({} for _ in params.models)
    return tuple({"fisher_norm": stats.norm(i, "fisher")} for i in range(len(params.models)))


def fisher_merge(chunk: Chunk, stats: Stats) -> torch.Tensor:
    """θ* = Σ w_i (F̂_i + floor) θ_i / Σ w_i (F̂_i + floor), in the chunk's dtype (float32 or wider)."""
    if not chunk.calibration:
        return weighted_average(chunk)
    floor = chunk.params.globals["fisher_floor"]
    num = torch.zeros_like(chunk.models[0])
    den = torch.zeros_like(num)
    for x, w, c in zip(chunk.models, chunk.params.per_model("weight"), chunk.calibration):
        f = c["fisher"].to(x.dtype, copy=True).reshape(x.shape)
        if "fisher_norm" in c:
            f /= c["fisher_norm"]
        f.add_(floor).mul_(w)
        num.addcmul_(f, x)
        den += f
    return num.div_(den)


register(
    MergeMethod(
        name="fisher",
        merge=fisher_merge,
        params=(
            Param("weight", float, default=1.0, per_model=True, low=0.0, low_open=True,
                  doc="the model's weight w_i"),
            Param("fisher_floor", float, default=1e-6, low=0.0, doc="added to every Fisher value"),
            Param("normalize_fisher", bool, default=False,
                  doc="divide each model's Fisher by its L2 norm over the model"),
        ),
        base="model",
        precision="float32",
        paper="arXiv:2111.09832",
        statistics=Statistics(lambda params: frozenset({"fisher"}), _prepare),
        doc="elementwise average weighted by each model's diagonal Fisher (Matena & Raffel, NeurIPS 2022)",
    )
)
