"""Karcher mean: the equal-weight Riemannian mean of the models' directions on the unit sphere."""

from __future__ import annotations

import torch

from streammerge.methods.base import Chunk, MergeMethod, Param, Stats
from streammerge.methods.registry import register
from streammerge.methods.sphere import GRAM, combine


def _coefficients(gram: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """c with out = Σ c_j x_j. The iterate u stays in the span of the unit vectors û_j = x_j/‖x_j‖,
    so it is kept as coefficients (u = Σ c_j û_j) and every inner product comes from the Gram matrix."""
    norms = gram.diagonal().sqrt()
    valid = norms > tol  # (near-)zero tensors count in the scale only
    if not valid.any():
        return torch.zeros_like(norms)
    inv = torch.where(valid, 1 / norms, 0)
    cos = gram * inv[:, None] * inv[None, :]  # ⟨û_i, û_j⟩
    alpha = valid.to(torch.float64) / valid.sum()

    def length(c: torch.Tensor) -> torch.Tensor:
        return (c @ cos @ c).clamp_min(0).sqrt()

    start = length(alpha)
    c = alpha / start if start >= tol else torch.eye(len(norms), dtype=torch.float64, device=gram.device)[int(valid.nonzero()[0])]  # first valid û
    for _ in range(max_iter):
        dots = (cos @ c).clamp(-1, 1)
        theta = dots.acos()
        k = torch.where(valid & (theta >= tol), alpha * theta / theta.sin(), 0)  # log map weights θ/sin θ
        tangent = k - (k * dots).sum() * c  # Σ k_i (û_i − ⟨u, û_i⟩ u)
        step = length(tangent)
        if step < tol:
            break
        c = step.cos() * c + step.sin() / step * tangent  # exp map
        size = length(c)
        if size > tol:
            c = c / size
    return norms.mean() * c * inv


def karcher_merge(chunk: Chunk, stats: Stats) -> torch.Tensor:
    """out = (Σ_i ‖x_i‖ / n) · u, u the Karcher mean of the unit vectors û_i = x_i/‖x_i‖ (those with
    ‖x_i‖ > tol), equal weights α = 1/n: start from the normalized mean of the û_i, then repeat at
    most ``max_iter`` times T = Σ α_i θ_i/sin θ_i (û_i − cos θ_i u) (θ_i = ∠(u, û_i), terms with
    θ_i < tol left out), stop when ‖T‖ < tol, else u ← cos‖T‖ u + sin‖T‖ T/‖T‖, renormalized.
    Each whole tensor is one point; a base model is one more input; a single input is returned as is.

    Buss & Fillmore, "Spherical averages and applications to spherical splines and interpolation",
    ACM TOG 20(2), 2001; mergekit's karcher.
    """
    if len(chunk.models) == 1:
        return chunk.models[0]
    g = chunk.params.globals
    return combine(chunk, _coefficients(stats["gram"], g["max_iter"], g["tol"]))


register(
    MergeMethod(
        name="karcher",
        merge=karcher_merge,
        params=(
            Param("max_iter", int, default=10, low=0, doc="most fixed-point iterations"),
            Param("tol", float, default=1e-5, low=0.0, doc="stop when the tangent step is shorter; smaller norms and angles are ignored"),
            Param("weight", float, per_model=True, doc="accepted for mergekit compatibility; ignored (equal weights)"),
        ),
        base="model",
        precision="load",
        paper="doi:10.1145/502122.502124",
        passes=(GRAM,),
    )
)
