"""Multi-SLERP: barycentric interpolation of several models on the hypersphere."""

from __future__ import annotations

import math

import torch

from streammerge.errors import PlanError
from streammerge.methods.base import Chunk, MergeMethod, Param, Stats
from streammerge.methods.registry import register
from streammerge.methods.sphere import GRAM, combine


def _coefficients(chunk: Chunk, gram: torch.Tensor) -> torch.Tensor:
    """c with out = Σ c_i x_i, from the Gram matrix of the x_i."""
    w = torch.tensor(chunk.params.per_model("weight"), dtype=torch.float64, device=gram.device)
    if chunk.params.globals["normalize_weights"]:
        if w.sum() == 0:
            raise PlanError(f"models: multislerp weights sum to 0 for tensor {chunk.name!r} and cannot be normalized")
        w = w / w.sum()
    eps = chunk.params.globals["eps"]
    norms = gram.diagonal().sqrt()
    a = w / (norms + eps)  # m = Σ a_i x_i
    mean_norm = (a @ gram @ a).clamp_min(0).sqrt()
    if mean_norm < eps:
        if len(w) == 2:
            return w  # mergekit's fallback: the weighted sum
        raise PlanError(f"models: the weighted mean of the unit vectors of tensor {chunk.name!r} is zero "
                        "(opposite vectors whose weights balance out); use different weights")
    return a * (w @ norms) * math.cos(eps) / mean_norm


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
        passes=(GRAM,),
    )
)
