"""Model Stock: move the models' average towards the base by an amount set by their task vectors' angle."""

from __future__ import annotations

import torch

from streammerge.methods.base import Chunk, MergeMethod, Param, StatPass, Stats
from streammerge.methods.reductions import as_norm, as_sum, squares
from streammerge.methods.registry import register
from streammerge.methods.task_vectors import stacked_task_vectors


def _gram(tv: torch.Tensor, wide: bool) -> torch.Tensor:
    """Partial sums over the last dim, in float64: [N, ..., C] -> [N, N, ...]. Wide: the exact dot
    products; else the terms mergekit's torch ops sum: x² for the norms, products rounded to the dtype."""
    if wide:
        t = tv.to(torch.float64)
        return torch.stack([torch.stack([(a * b).sum(-1) for b in t]) for a in t])
    def term(i: int, j: int) -> torch.Tensor:
        return squares(tv[i]).sum(-1) if i == j else (tv[i] * tv[j]).to(torch.float64).sum(-1)
    return torch.stack([torch.stack([term(i, j) for j in range(len(tv))]) for i in range(len(tv))])


def _ratio(norms: list[torch.Tensor], dots: dict[tuple[int, int], torch.Tensor]) -> torch.Tensor:
    """t = N·cos / (1 + (N − 1)·cos), cos the mean pairwise cosine (norm products clamped at 1e-6);
    t = 0 where the denominator is below 1e-6 (mergekit keeps the base there), in mergekit's order."""
    n = len(norms)
    cos = torch.stack([(dots[i, j] / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
                       for i in range(n) for j in range(i + 1, n)]).mean(0)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos), n * cos / safe)


def _whole_ratio(gram: torch.Tensor, dtype: torch.dtype, wide: bool) -> torch.Tensor:
    """The ratio from the summed partials: in float64 (wide), else rounded as torch's reductions."""
    n = gram.shape[0]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    if wide:
        return _ratio([gram[i, i].sqrt() for i in range(n)], {p: gram[p] for p in pairs})
    return _ratio([as_norm(gram[i, i], dtype) for i in range(n)], {p: as_sum(gram[p], dtype) for p in pairs})


def _fiber_ratio(tv: torch.Tensor, wide: bool) -> torch.Tensor:
    """One ratio per last-dim fiber: rows are whole in a chunk, so mergekit's own ops run on them."""
    if wide:
        return _whole_ratio(_gram(tv, True), tv.dtype, True)
    pairs = [(i, j) for i in range(len(tv)) for j in range(i + 1, len(tv))]
    return _ratio([torch.norm(v, dim=-1) for v in tv], {(i, j): (tv[i] * tv[j]).sum(-1) for i, j in pairs})


def _per_fiber(chunk: Chunk) -> bool:
    """filter_wise: one ratio per last-dim fiber (a row of a matrix); rows are whole in a chunk. A
    vector is one fiber, so it takes the whole-tensor statistic."""
    return chunk.params.globals["filter_wise"] and len(chunk.shape) >= 2


def _collect(chunk: Chunk, stats: Stats) -> dict[str, torch.Tensor]:
    if _per_fiber(chunk):
        return {}
    tv = stacked_task_vectors(chunk)
    rows = tv.reshape(len(tv), chunk.row_stop - chunk.row_start, -1)
    return {"gram": chunk.per_row(_gram(rows, chunk.wide))}


def _finish(totals: dict[str, torch.Tensor], chunk: Chunk, stats: Stats) -> Stats:
    return {"t": _whole_ratio(totals["gram"].sum(-1), chunk.base.dtype, chunk.wide)} if totals else stats


def model_stock_merge(chunk: Chunk, stats: Stats) -> torch.Tensor:
    """out = t·mean(x_i) + (1 − t)·B with t = N·cos θ / (1 + (N − 1)·cos θ), cos θ the mean pairwise
    cosine between the task vectors x_i − B (whole tensor, or per row with ``filter_wise``); t = 0
    where 1 + (N − 1)·cos θ is below 1e-6.

    Jang et al., "Model Stock: All we need is just a few fine-tuned models", ECCV 2024 (arXiv 2403.19522).
    """
    t = stats["t"] if "t" in stats else _fiber_ratio(stacked_task_vectors(chunk), chunk.wide).unsqueeze(-1)
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
