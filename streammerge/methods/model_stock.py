"""Model Stock: move the models' average towards the base by an amount set by their task vectors' angle."""

from __future__ import annotations

import torch

from streammerge.methods.base import Chunk, MergeMethod, Param, StatPass, Stats
from streammerge.methods.registry import register
from streammerge.methods.task_vectors import stacked_task_vectors


def _gram(tv: torch.Tensor) -> torch.Tensor:
    """float64 dot products over the last dim: [N, ..., C] -> [N, N, ...]."""
    t = tv.to(torch.float64)
    return torch.stack([torch.stack([(a * b).sum(-1) for b in t]) for a in t])


def _ratio(gram: torch.Tensor) -> torch.Tensor:
    """t = N·cos / (1 + (N − 1)·cos), cos the mean pairwise cosine (norm products clamped at 1e-6, as mergekit)."""
    n = gram.shape[0]
    norms = [gram[i, i].sqrt() for i in range(n)]
    cos = torch.stack([(gram[i, j] / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
                       for i in range(n) for j in range(i + 1, n)]).mean(0)
    return n * cos / (1 + (n - 1) * cos)


def _per_fiber(chunk: Chunk) -> bool:
    """filter_wise: one ratio per last-dim fiber (a row of a matrix); rows are whole in a chunk. A
    vector is one fiber, so it takes the whole-tensor statistic."""
    return chunk.params.globals["filter_wise"] and len(chunk.shape) >= 2


def _collect(chunk: Chunk, stats: Stats) -> dict[str, torch.Tensor]:
    if _per_fiber(chunk):
        return {}
    tv = stacked_task_vectors(chunk)
    return {"gram": chunk.per_row(_gram(tv.reshape(len(tv), chunk.row_stop - chunk.row_start, -1)))}


def _finish(totals: dict[str, torch.Tensor], chunk: Chunk, stats: Stats) -> Stats:
    return {"t": _ratio(totals["gram"].sum(-1))} if totals else stats


def model_stock_merge(chunk: Chunk, stats: Stats) -> torch.Tensor:
    """out = t·mean(x_i) + (1 − t)·B with t = N·cos θ / (1 + (N − 1)·cos θ), cos θ the mean pairwise
    cosine between the task vectors x_i − B (whole tensor, or per row with ``filter_wise``).

    Jang et al., "Model Stock: All we need is just a few fine-tuned models", ECCV 2024 (arXiv 2403.19522).
    """
    t = stats["t"] if "t" in stats else _ratio(_gram(stacked_task_vectors(chunk))).unsqueeze(-1)
    t = t.to(chunk.base.dtype)
    return t * (sum(chunk.models) / len(chunk.models)) + (1 - t) * chunk.base


register(
    MergeMethod(
        name="model_stock",
        merge=model_stock_merge,
        params=(Param("filter_wise", bool, default=False, doc="one ratio per row instead of per tensor"),),
        base="required",
        precision="load",
        paper="arXiv:2403.19522",
        passes=(StatPass(_collect, _finish),),
        min_models=2,
    )
)
