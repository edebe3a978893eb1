"""Karcher mean: the equal-weight Riemannian mean of the models' directions on the unit sphere."""

from __future__ import annotations

from typing import Any

import torch

from streammerge.methods.base import Chunk, MergeMethod, Param, StatPass, Stats, TensorParams
from streammerge.methods.reductions import as_norm, as_sum, squares
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


# Under compute_dtype auto, mergekit's iteration itself: the unit vectors and the iterate in the
# dtype, norms in float32 (float64 inputs: float64). Every norm or dot product of the iterate is a
# statistics pass (two, then three per iteration); each pass replays the elementwise steps so far on
# its chunk from the scalars recorded in ``stats["steps"]``.

def _norm_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(x: torch.Tensor, chunk: Chunk) -> torch.Tensor:
    return x.reshape(chunk.row_stop - chunk.row_start, -1)


def _replay(chunk: Chunk, stats: Stats) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """The valid unit vectors, the iterate as far as ``stats`` reach, and the tangent when the
    current step has its dot products but not yet the tangent's norm. A chunk that is the whole
    tensor (the same object in every pass) resumes from its last completed step in ``stats["cache"]``;
    other chunks are read again by each pass and replay from the start."""
    tol = chunk.params.globals["tol"]
    cache = stats["cache"] if chunk.row_start == 0 and chunk.row_stop == chunk.total_rows else {}
    if cache.get("chunk") is chunk:
        units, alphas, mean, done = cache["units"], cache["alphas"], cache["mean"], cache["steps"]
    else:
        valid = [(x, n) for x, n in zip(chunk.models, stats["norms"]) if n.item() > tol]  # never a zero norm
        units = [x / n for x, n in valid]
        alpha = 1 / len(chunk.models)  # mergekit's weights: 1/n each, renormalized over the valid inputs
        alphas = [alpha / sum([alpha] * len(valid))] * len(valid)
        mean = torch.zeros_like(units[0])
        for a, u in zip(alphas, units):
            mean += a * u
        if "mean_norm" not in stats:
            return units, mean, None
        mean, done = units[0].clone() if stats["mean_norm"].item() < tol else mean / stats["mean_norm"], 0
    for done, step in enumerate(stats["steps"][done:], done + 1):
        tangent = torch.zeros_like(mean)
        for a, u, dot in zip(alphas, units, step["dots"]):
            theta = torch.arccos(dot)
            if theta.item() >= tol:
                tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        if "tangent_norm" not in step:
            return units, mean, tangent
        norm = step["tangent_norm"]
        if norm.item() < tol:
            break
        mean = torch.cos(norm) * mean + torch.sin(norm) * (tangent / norm)
        if "unit_norm" not in step:
            return units, mean, None
        if step["unit_norm"].item() > tol:
            mean = mean / step["unit_norm"]
        cache.update(chunk=chunk, units=units, alphas=alphas, mean=mean, steps=done)
    return units, mean, None


def _stage(stats: Stats) -> str:
    """The next statistic mergekit's iteration needs."""
    if "norms" not in stats:
        return "norms"
    if "mean_norm" not in stats:
        return "mean_norm"
    step = stats["steps"][-1] if stats["steps"] else {"unit_norm": None}
    if "unit_norm" in step:
        return "dots"
    return "tangent_norm" if "tangent_norm" not in step else "unit_norm"


def _collect(chunk: Chunk, stats: Stats) -> dict[str, Any]:
    if chunk.wide:
        return GRAM.collect(chunk, stats)
    if not stats and chunk.row_start == 0 and chunk.row_stop == chunk.total_rows:
        # A tensor in one chunk runs every pass here, with the same collect and finish, rather than
        # one engine pass each: the same bits, without 3·max_iter trips through the engine (a
        # max_iter of 1200 on 363 small tensors went from minutes to seconds).
        while not stats.get("done", False):
            stats = _finish(_sums(chunk, stats), chunk, stats)
        return {"final": stats}
    return _sums(chunk, stats)


def _sums(chunk: Chunk, stats: Stats) -> dict[str, torch.Tensor]:
    """Per-row partial sums of the statistic mergekit's iteration needs next."""
    wide = _norm_dtype(chunk.models[0].dtype)  # mergekit's norms: of x.to(float32)
    stage = _stage(stats)
    if stage == "norms":
        sums = [squares(_rows(x.to(wide), chunk)).sum(1) for x in chunk.models]
    else:
        units, mean, tangent = _replay(chunk, stats)
        if stage == "dots":  # torch.dot: exact products, accumulated in float32
            m = _rows(mean, chunk).to(torch.float64)
            sums = [(m * _rows(u, chunk).to(torch.float64)).sum(1) for u in units]
        else:
            sums = [squares(_rows((mean if tangent is None else tangent).to(wide), chunk)).sum(1)]
    return {"sums": chunk.per_row(torch.stack(sums))}


def _finish(totals: dict[str, Any], chunk: Chunk, stats: Stats) -> Stats:
    if "final" in totals:
        return totals["final"]
    if "sums" not in totals:
        return {**GRAM.finish(totals, chunk, stats), "done": True}
    g, dtype = chunk.params.globals, chunk.models[0].dtype
    wide, sums, stage = _norm_dtype(dtype), totals["sums"].sum(-1), _stage(stats)
    if stage == "norms":
        norms = list(as_norm(sums, wide))
        done = len(norms) == 1 or not any(n.item() > g["tol"] for n in norms)
        return {"norms": norms, "steps": [], "done": done, "cache": {}}
    if stage == "mean_norm":
        return {**stats, "mean_norm": as_norm(sums[0], wide), "done": g["max_iter"] == 0}
    steps = stats["steps"]  # extended in place: a pass's stats replace the last's (copies cost O(max_iter²))
    if stage == "dots":
        steps.append({"dots": list(as_sum(sums, dtype).clamp(-1, 1))})
        return {**stats}
    norm = as_norm(sums[0], wide)
    steps[-1][stage] = norm
    converged = stage == "tangent_norm" and norm.item() < g["tol"]
    done = converged or (stage == "unit_norm" and len(steps) == g["max_iter"])
    return {**stats, "steps": steps, "done": done}


def _passes(params: TensorParams) -> tuple[StatPass, ...]:
    """Wide: one Gram pass; else the norms, the mean's norm and three passes per iteration, each
    only while the iteration goes on."""
    step = StatPass(_collect, _finish, when=lambda stats: not stats.get("done", False))
    return (step,) * (2 + 3 * params.globals["max_iter"])


def _mergekit_karcher(chunk: Chunk, stats: Stats) -> torch.Tensor:
    tol = chunk.params.globals["tol"]
    if not any(n.item() > tol for n in stats["norms"]):
        return sum(x * 0 for x in chunk.models)
    scale = sum(1 / len(chunk.models) * n for n in stats["norms"])
    return scale * _replay(chunk, stats)[1]


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
    if not chunk.wide:
        return _mergekit_karcher(chunk, stats)
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
        passes=_passes,
    )
)
