"""Arcee Fusion: keep the other model's changes where they matter most to the output distribution."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from streammerge.methods.base import Chunk, MergeMethod, StatPass, Stats
from streammerge.methods.registry import register
from streammerge.methods.selection import threshold_values, top_k_passes

_QUANTILES = (0.25, 0.5, 0.75)


def _kl(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KL(softmax(x) ‖ softmax(b)) along the last dim, in mergekit's order of operations: float32
    rounding moves elements across the threshold, so the order decides the result."""
    p = F.softmax(x, dim=-1) + 1e-8
    q = F.softmax(b, dim=-1) + 1e-8
    return torch.sum(p * torch.log(p / q), dim=-1)


def _importance(chunk: Chunk, stats: Stats) -> torch.Tensor:
    """|x − B| · KL of the element's row (matrices: rows are whole in a chunk)."""
    x, b = chunk.models[0], chunk.base
    kl = stats["kl"] if "kl" in stats else _kl(x, b).unsqueeze(-1)
    return (x - b).abs() * kl


def _prepare_collect(chunk: Chunk, stats: Stats) -> dict[str, torch.Tensor]:
    """Count the negative importances (rounding can make a KL slightly negative). A vector is a
    single softmax: gather it whole (hidden-size) to take its KL first."""
    if len(chunk.shape) < 2:
        return {"x": chunk.per_row(chunk.models[0].reshape(-1)), "b": chunk.per_row(chunk.base.reshape(-1))}
    return {"negative": (_importance(chunk, stats) < 0).sum()}


def _prepare_finish(totals: dict[str, torch.Tensor], chunk: Chunk, stats: Stats) -> Stats:
    if "negative" in totals:
        return {"negative": int(totals["negative"])}
    x, b = totals["x"], totals["b"]
    kl = _kl(x, b)
    return {"kl": kl, "negative": int(((x - b).abs() * kl < 0).sum())}


def _ranks(chunk: Chunk) -> list[int]:
    """mergekit's quantile q is the sorted value at index int(q·(n − 1))."""
    return [int(q * (chunk.numel - 1)) for q in _QUANTILES]


def _selected(chunk: Chunk, stats: Stats) -> list[torch.Tensor]:
    """The value at ascending rank m, with n_neg negative values: minus the (m + 1)-th largest of
    max(−v, 0) when m < n_neg, else the (n − m)-th largest of max(v, 0)."""
    v = _importance(chunk, stats)
    return [(-v).clamp(min=0) if m < stats["negative"] else v.clamp(min=0) for m in _ranks(chunk)]


def _counts(chunk: Chunk, stats: Stats) -> list[int | None]:
    return [m + 1 if m < stats["negative"] else chunk.numel - m for m in _ranks(chunk)]


def _quantiles(chunk: Chunk, stats: Stats) -> list[float]:
    values = threshold_values(stats, "fusion")
    return [-v if m < stats["negative"] else v for m, v in zip(_ranks(chunk), values)]


def arcee_fusion_merge(chunk: Chunk, stats: Stats) -> torch.Tensor:
    """importance = |x − B| · KL(softmax(x) ‖ softmax(B)) along the last dim;
    out = B + (x − B)·[importance >= median + 1.5·(q3 − q1)], quantiles of the whole tensor's importance.

    Arcee AI, mergekit docs ("Arcee Fusion").
    """
    x, b = chunk.models[0], chunk.base
    q1, median, q3 = (torch.tensor(q, dtype=b.dtype, device=b.device) for q in _quantiles(chunk, stats))
    mask = _importance(chunk, stats) >= median + 1.5 * (q3 - q1)
    return b + (x - b) * mask.to(b.dtype)


register(
    MergeMethod(
        name="arcee_fusion",
        merge=arcee_fusion_merge,
        params=(),
        base="required",
        precision="load",
        paper="mergekit docs: Arcee Fusion",
        passes=(StatPass(_prepare_collect, _prepare_finish), *top_k_passes(_selected, _counts, "fusion")),
        models_exactly=2,
    )
)
