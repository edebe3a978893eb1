"""Multi-SLERP: barycentric interpolation of several models on the hypersphere."""

from __future__ import annotations

import math

import torch

from streammerge.errors import PlanError
from streammerge.methods.base import Chunk, MergeMethod, Param, StatPass, Stats
from streammerge.methods.reductions import as_norm, as_sum, squares
from streammerge.methods.registry import register
from streammerge.methods.sphere import GRAM, combine, norms_collect, vectors


def _weights(chunk: Chunk, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    w = torch.tensor(chunk.params.per_model("weight"), dtype=dtype, device=device)
    if chunk.params.globals["normalize_weights"]:
        if w.sum() == 0:
            raise PlanError(f"models: multislerp weights sum to 0 for tensor {chunk.name!r} and cannot be normalized")
        w = w / w.sum()
    return w


def _mean_failed(chunk: Chunk) -> PlanError:
    return PlanError(f"models: the weighted mean of the unit vectors of tensor {chunk.name!r} is zero "
                     "(opposite vectors whose weights balance out); use different weights")


def _coefficients(chunk: Chunk, gram: torch.Tensor) -> torch.Tensor:
    """c with out = Σ c_i x_i, from the Gram matrix of the x_i."""
    w = _weights(chunk, torch.float64, gram.device)
    eps = chunk.params.globals["eps"]
    norms = gram.diagonal().sqrt()
    a = w / (norms + eps)  # m = Σ a_i x_i
    mean_norm = (a @ gram @ a).clamp_min(0).sqrt()
    if mean_norm < eps:
        if len(w) == 2:
            return w  # mergekit's fallback: the weighted sum
        raise _mean_failed(chunk)
    return a * (w @ norms) * math.cos(eps) / mean_norm


# Under compute_dtype auto, mergekit's steps in the dtype: each whole-tensor norm or dot product is a
# statistics pass, and each pass recomputes the elementwise steps before it on its chunk.

def _units(chunk: Chunk, stats: Stats) -> torch.Tensor:
    """[N, rows, -1]: x_i / (‖x_i‖ + ε)."""
    eps = chunk.params.globals["eps"]
    return torch.stack([v / (n + eps) for v, n in zip(vectors(chunk, None), stats["norms"])])


def _weighted_sum(xs: torch.Tensor, stats: Stats) -> torch.Tensor:
    return (xs * stats["weights"].view(-1, 1, 1)).sum(0)


def _mean(chunk: Chunk, stats: Stats) -> tuple[torch.Tensor, torch.Tensor]:
    """The unit vectors and their weighted mean, normalized once its norm is known."""
    units = _units(chunk, stats)
    mean = _weighted_sum(units, stats)
    return units, mean / stats["mean_norm"] if "mean_norm" in stats else mean


def _tangent(chunk: Chunk, stats: Stats) -> tuple[torch.Tensor, torch.Tensor]:
    units, mean = _mean(chunk, stats)
    return mean, _weighted_sum(units - stats["dots"].view(-1, 1, 1) * mean, stats)


def _norms_finish(totals: dict[str, torch.Tensor], chunk: Chunk, stats: Stats) -> Stats:
    if "squares" not in totals:
        return GRAM.finish(totals, chunk, stats)
    dtype, squares_ = chunk.models[0].dtype, totals["squares"].sum(-1)
    weights = _weights(chunk, dtype, squares_.device)
    return {**stats, "norms": as_norm(squares_, dtype).view(-1, 1), "weights": weights}


def _mean_collect(chunk: Chunk, stats: Stats) -> dict[str, torch.Tensor]:
    return {"squares": chunk.per_row(squares(_mean(chunk, stats)[1]).sum(1))}


def _mean_finish(totals: dict[str, torch.Tensor], chunk: Chunk, stats: Stats) -> Stats:
    norm = as_norm(totals["squares"].sum(-1), chunk.models[0].dtype)
    return {**stats, "mean_norm": norm, "spherical": not bool(norm < chunk.params.globals["eps"])}


def _dots_collect(chunk: Chunk, stats: Stats) -> dict[str, torch.Tensor]:
    units, mean = _mean(chunk, stats)
    return {"dots": chunk.per_row((units * mean).to(torch.float64).sum(-1))}


def _dots_finish(totals: dict[str, torch.Tensor], chunk: Chunk, stats: Stats) -> Stats:
    return {**stats, "dots": as_sum(totals["dots"].sum(-1), chunk.models[0].dtype)}


def _tangent_collect(chunk: Chunk, stats: Stats) -> dict[str, torch.Tensor]:
    return {"squares": chunk.per_row(squares(_tangent(chunk, stats)[1]).sum(1))}


def _tangent_finish(totals: dict[str, torch.Tensor], chunk: Chunk, stats: Stats) -> Stats:
    norm = as_norm(totals["squares"].sum(-1), chunk.models[0].dtype) + chunk.params.globals["eps"]
    return {**stats, "tangent_norm": norm}


def _spherical(stats: Stats) -> bool:
    """Whether mergekit's spherical steps apply (else its 2-model fallback, or an error)."""
    return stats.get("spherical", False)


# wide: one Gram pass; auto: the norms, the mean's norm, the dot products, the tangent's norm
_PASSES = (StatPass(norms_collect, _norms_finish),
           StatPass(_mean_collect, _mean_finish, when=lambda stats: "norms" in stats),
           StatPass(_dots_collect, _dots_finish, when=_spherical),
           StatPass(_tangent_collect, _tangent_finish, when=_spherical))


def _mergekit_multislerp(chunk: Chunk, stats: Stats) -> torch.Tensor:
    shape = (chunk.row_stop - chunk.row_start, *chunk.shape[1:])
    if not _spherical(stats):
        if len(chunk.models) != 2:
            raise _mean_failed(chunk)
        (v0, v1), w = vectors(chunk, None), stats["weights"]
        out = (v0 * w[0] + v1 * w[1]).view(shape)
    else:
        mean, tangent = _tangent(chunk, stats)
        norm = stats["tangent_norm"]
        out = mean * torch.cos(norm) + tangent * (torch.sin(norm) / norm)
        out = (out * (stats["norms"].squeeze(-1) * stats["weights"]).sum()).view(shape)
    return out if chunk.base is None else out + chunk.base


def multislerp_merge(chunk: Chunk, stats: Stats) -> torch.Tensor:
    """out = cos ε · (Σ w_i‖x_i‖) · m / ‖m‖ with m = Σ w_i x_i / (‖x_i‖ + ε), w normalized to sum 1 when
    ``normalize_weights``; x_i are task vectors (base added back) when there is a base. A single
    model is returned as is; ‖m‖ < ε falls back to Σ w_i x_i for 2 models and is an error otherwise.

    mergekit's tangent-space step adds nothing: with u_i = x_i/(‖x_i‖ + ε) and m̂ = m/‖m‖, the tangent
    Σ w_i (u_i − ⟨u_i, m̂⟩ m̂) = m − ‖m‖ m̂ = 0, so its exponential map, at the length ‖0‖ + ε,
    returns m̂ · cos ε.
    Goddard, "Multi-SLERP" (https://goddard.blog/posts/multislerp-wow-what-a-cool-idea).
    """
    if len(chunk.models) == 1:
        return chunk.models[0]
    if not chunk.wide:
        return _mergekit_multislerp(chunk, stats)
    return combine(chunk, _coefficients(chunk, stats["gram"]))


register(
    MergeMethod(
        name="multislerp",
        merge=multislerp_merge,
        params=(
            Param("weight", float, required=True, per_model=True, doc="the model's weight"),
            Param("normalize_weights", bool, default=True, doc="divide the weights by their sum"),
            Param("eps", float, default=1e-8, low=0.0, doc="added to each norm; smallest usable mean norm"),
        ),
        base="optional",
        precision="load",
        paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
        passes=_PASSES,
    )
)
