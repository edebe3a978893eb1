"""Reinforced Agent Merging: RAM and its tensor-local RAM+ (ramplus_tl).

With τ_i = x_i − B, model i is *active* at an element when |τ_i| > ε, and c = the number of active
models there. An element's merged task vector is τ_i where only model i is active (unique), the
mean Σ τ_i / c of the active ones where c > 1 (shared), and 0 where none is.

RAM+ scales model i's unique entries by λ_i = 1 + r·clamp(s_i / max(u_i, ε), 0, α), with s_i / u_i
the number of model i's shared / unique entries in the tensor (one integer statistics pass).
"""

from __future__ import annotations

import torch

from streammerge.methods.base import Chunk, MergeMethod, Param, StatPass, Stats
from streammerge.methods.registry import register
from streammerge.methods.task_vectors import stacked_task_vectors

_EPSILON = Param("epsilon", float, default=1e-5, low=0.0, low_open=True, doc="|τ| at or below it counts as no change")


def _active(chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Task vectors [N, ...], which are active, and how many models are active per element."""
    tv = stacked_task_vectors(chunk)
    active = tv.abs() > chunk.params.globals["epsilon"]
    return tv, active, active.sum(0)


def _merge(chunk: Chunk, unique_scale: torch.Tensor | None) -> torch.Tensor:
    """``unique_scale``: λ_i, whose dtype the result takes (mergekit's float32 λ promotes RAM+ to it)."""
    tv, active, count = _active(chunk)
    tv = tv * active
    if unique_scale is None:
        unique_scale = torch.ones(len(tv), dtype=tv.dtype, device=tv.device)
    scale = unique_scale.to(tv.device).view(-1, *[1] * chunk.base.dim())
    # mergekit divides each shared entry by c before summing over the models
    return chunk.base + (tv * (count == 1) * scale + tv * (count > 1) / count.clamp(min=1)).sum(0)


def ram_merge(chunk: Chunk, stats: Stats) -> torch.Tensor:
    """B + Σ_i τ_i·a_i·([c = 1] + [c > 1] / c), a_i = [|τ_i| > ε], c = Σ_i a_i.

    mergekit docs, "Reinforced Agent Merging" (arXiv 2601.13572).
    """
    return _merge(chunk, None)


def _overlap_collect(chunk: Chunk, stats: Stats) -> dict[str, torch.Tensor]:
    _, active, count = _active(chunk)
    dims = list(range(1, active.dim()))
    return {"shared": (active & (count > 1)).sum(dims), "unique": (active & (count == 1)).sum(dims)}


def _overlap_finish(totals: dict[str, torch.Tensor], chunk: Chunk, stats: Stats) -> Stats:
    """λ_i: in float64 (wide), else as mergekit: a float32 tensor from the integer counts."""
    g = chunk.params.globals
    shared, unique = totals["shared"].cpu(), totals["unique"].cpu()
    if chunk.wide:
        shared, unique = shared.to(torch.float64), unique.to(torch.float64)
    rho = shared / unique.clamp(min=g["epsilon"])
    return {"unique_scale": 1 + g["r"] * rho.clamp(min=0, max=g["alpha"])}


def ramplus_tl_merge(chunk: Chunk, stats: Stats) -> torch.Tensor:
    """RAM with model i's unique entries scaled by 1 + r·clamp(s_i / max(u_i, ε), 0, α), s_i and
    u_i counted over the whole tensor. Under ``auto`` λ is float32 and, as in mergekit, the unique
    terms, the sum and the result are computed in float32 (rounded to the plan's dtype on writing).

    mergekit docs, "Reinforced Agent Merging Plus (Tensor-Local)" (arXiv 2601.13572).
    """
    return _merge(chunk, stats["unique_scale"])


register(
    MergeMethod(
        name="ram", merge=ram_merge, params=(_EPSILON,), base="required", precision="load",
        paper="arXiv:2601.13572", doc="unique task-vector entries kept, shared ones averaged", min_models=0,
    )
)
register(
    MergeMethod(
        name="ramplus_tl", merge=ramplus_tl_merge, base="required", precision="load", paper="arXiv:2601.13572",
        params=(
            Param("r", float, default=0.1, low=0.0, doc="strength of the unique-entry boost"),
            Param("alpha", float, default=0.2, low=0.0, doc="cap on the shared/unique ratio"),
            _EPSILON,
        ),
        passes=(StatPass(_overlap_collect, _overlap_finish),),
        doc="RAM with each model's unique entries boosted by its tensor's shared/unique ratio",
        min_models=0,
    )
)
