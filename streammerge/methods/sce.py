"""SCE: select by variance, calculate matrix-level weights, erase minority signs."""

from __future__ import annotations

import torch

from streammerge.methods.base import Chunk, MergeMethod, Param, StatPass, Stats, TensorParams
from streammerge.methods.reductions import as_mean
from streammerge.methods.registry import register
from streammerge.methods.selection import top_k_mask, top_k_passes
from streammerge.methods.task_vectors import sign_agreement, stacked_task_vectors


def _variance(chunk: Chunk, stats: Stats) -> list[torch.Tensor]:
    return [torch.var(stacked_task_vectors(chunk), dim=0, unbiased=False)]


def _selected(chunk: Chunk, stats: Stats) -> torch.Tensor:
    """Task vectors [N, ...] with the positions outside the variance top-k zeroed."""
    tv = stacked_task_vectors(chunk)
    if chunk.params.globals["select_topk"] >= 1:
        return tv
    if stats["k"] == 0:
        return torch.zeros_like(tv)
    return tv * top_k_mask(_variance(chunk, stats)[0], 0, chunk, stats, "sce")


def _count_collect(chunk: Chunk, stats: Stats) -> dict[str, torch.Tensor]:
    return {"nonzero": torch.count_nonzero(_variance(chunk, stats)[0])}


def _count_finish(totals: dict[str, torch.Tensor], chunk: Chunk, stats: Stats) -> Stats:
    # the float32 product mergekit takes int() of (int64 tensor × Python float)
    return {"k": int(totals["nonzero"] * chunk.params.globals["select_topk"])}


# k = 0 keeps nothing: ``_selected`` handles it, the selection keeps all (None)
_SELECT = top_k_passes(_variance, lambda chunk, stats: [stats["k"] or None], "sce", elementwise=True)


def _weight_collect(chunk: Chunk, stats: Stats) -> dict[str, torch.Tensor]:
    tv = _selected(chunk, stats)
    # mergekit squares in the dtype
    squares = tv.to(torch.float64) ** 2 if chunk.wide else tv.square().to(torch.float64)
    return {"squares": chunk.per_row(squares.reshape(len(tv), chunk.row_stop - chunk.row_start, -1).sum(-1))}


def _weight_finish(totals: dict[str, torch.Tensor], chunk: Chunk, stats: Stats) -> Stats:
    """w_i = mean(τ_i²) / Σ_j mean(τ_j²); uniform when that sum is below 1e-6. Wide: in float64;
    else as mergekit: the means in the dtype, their sum taken in the dtype and read as a float."""
    squares = totals["squares"].sum(-1)
    if chunk.wide:
        means = squares / chunk.numel
        total = float(means.sum())
        uniform = torch.full_like(means, 1 / len(means))
        return {**stats, "weights": uniform if abs(total) < 1e-6 else means / total}
    means = as_mean(squares, chunk.numel, chunk.base.dtype)
    total = torch.sum(means).item()
    return {**stats, "weights": torch.ones_like(means) / len(means) if abs(total) < 1e-6 else means / total}


def _passes(params: TensorParams) -> tuple[StatPass, ...]:
    select = (StatPass(_count_collect, _count_finish), *_SELECT) if params.globals["select_topk"] < 1 else ()
    return (*select, StatPass(_weight_collect, _weight_finish))


def sce_merge(chunk: Chunk, stats: Stats) -> torch.Tensor:
    """τ_i = x_i − B, zeroed outside the k = int(select_topk · #nonzero) positions of largest
    Var_i(τ_i); w_i = mean(τ_i²) / Σ_j mean(τ_j²); m_i = TIES sum-sign agreement;
    out = B + Σ w_i m_i τ_i / max(Σ w_i m_i, 1e-6).

    Wan et al., "FuseChat: Knowledge Fusion of Chat Models" (arXiv 2408.07990).
    """
    tv = _selected(chunk, stats)
    weights = stats["weights"].to(tv.dtype).view(-1, *[1] * chunk.base.dim())
    erased = weights * torch.stack([m != 0 for m in sign_agreement(list(tv))])
    return chunk.base + (tv * erased).sum(0) / erased.sum(0).clamp(min=1e-6)


register(
    MergeMethod(
        name="sce",
        merge=sce_merge,
        params=(
            Param("select_topk", float, default=1.0, low=0.0, high=1.0, doc="fraction of the positions (by variance across models) kept"),
            Param("int8_mask", bool, default=False, doc="accepted for mergekit compatibility; no effect"),
        ),
        base="required",
        precision="load",
        paper="arXiv:2408.07990",
        min_models=0,
        passes=_passes,
    )
)
