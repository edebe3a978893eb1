"""NuSLERP: spherical interpolation of two models (or of their task vectors) weighted per model."""

from __future__ import annotations

import math

import torch

from streammerge.methods.base import Chunk, MergeMethod, Param, StatPass, Stats, TensorParams
from streammerge.methods.reductions import as_norm, as_sum, squares
from streammerge.methods.registry import register
from streammerge.methods.sphere import GRAM, combine, norms_collect, pairwise, vectors


def _layout(chunk: Chunk) -> str:
    """'whole': the tensor is one vector; 'last': vectors along the last dim (inside every chunk
    row); 'first': vectors along dim 0, each spanning every chunk."""
    g = chunk.params.globals
    if g["nuslerp_flatten"]:
        return "whole"
    if g["nuslerp_row_wise"]:  # mergekit's flag: dim 0, i.e. the columns of a matrix
        return "first"
    return "last" if len(chunk.shape) >= 2 else "whole"


def _norms_collect(chunk: Chunk, stats: Stats) -> dict[str, torch.Tensor]:
    """Whole-tensor vectors only: vectors along the last dim lie inside each chunk row, where the
    merge takes their norms itself."""
    return norms_collect(chunk, stats) if _layout(chunk) == "whole" else {}


def _norms_finish(totals: dict[str, torch.Tensor], chunk: Chunk, stats: Stats) -> Stats:
    if "squares" not in totals:
        return GRAM.finish(totals, chunk, stats)
    dtype = chunk.models[0].dtype
    norms = [as_norm(s, dtype).reshape(1).clamp(min=1e-7) for s in totals["squares"].sum(-1)]
    return {**stats, "norms": norms}


def _cos_collect(chunk: Chunk, stats: Stats) -> dict[str, torch.Tensor]:
    u0, u1 = (v / n for v, n in zip(vectors(chunk, None), stats["norms"]))
    return {"dot": chunk.per_row((u0 * u1).to(torch.float64).sum(1))}


def _cos_finish(totals: dict[str, torch.Tensor], chunk: Chunk, stats: Stats) -> Stats:
    return {**stats, "cos": as_sum(totals["dot"].sum(-1), chunk.models[0].dtype).reshape(1).clamp(-1, 1)}


# the whole tensor as one vector: wide, one Gram pass; else mergekit's norms, then its cosine of
# the unit vectors
_WHOLE = (StatPass(_norms_collect, _norms_finish),
          StatPass(_cos_collect, _cos_finish, when=lambda stats: "norms" in stats))


def _exponent_collect(chunk: Chunk, stats: Stats) -> dict[str, torch.Tensor]:
    vs = vectors(chunk, torch.float64 if chunk.wide else None)
    return {"amax": chunk.per_row(torch.stack([v.abs().amax(1) for v in vs]).amax(0))}


def _exponent_finish(totals: dict[str, torch.Tensor], chunk: Chunk, stats: Stats) -> Stats:
    return {**stats, "exponent": math.frexp(float(totals["amax"].max()))[1]}  # every |x| < 2^exponent


def _fraction_bits(chunk: Chunk) -> int:
    return 62 - chunk.total_rows.bit_length()  # rows · 2^bits < 2^62: the int64 column sums cannot overflow


def _columns_collect(chunk: Chunk, stats: Stats) -> dict[str, torch.Tensor]:
    """Per-column Σ_rows x_i·x_j as integers, so that chunk partials add exactly: the inputs are
    scaled below 1 by a power of two (exact) and each product is rounded to a fixed-point int64."""
    xs = [v * 2.0 ** -stats["exponent"] for v in vectors(chunk)]
    quantum = 2.0 ** _fraction_bits(chunk)
    return {"gram": pairwise(xs, lambda p: torch.round(p * quantum).to(torch.int64).sum(0))}


def _columns_finish(totals: dict[str, torch.Tensor], chunk: Chunk, stats: Stats) -> Stats:
    unit = 2.0 ** (2 * stats["exponent"] - _fraction_bits(chunk))
    return {**stats, "gram": totals["gram"].to(torch.float64) * unit}


def _column_sums(chunk: Chunk, terms: list[torch.Tensor], exponent: int) -> torch.Tensor:
    """Σ over rows of each [rows, cols] term, every |term| < 2^exponent, as fixed-point int64."""
    scale = 2.0 ** (_fraction_bits(chunk) - exponent)
    return torch.stack([torch.round(t.to(torch.float64) * scale).to(torch.int64).sum(0) for t in terms])


def _column_values(sums: torch.Tensor, chunk: Chunk, exponent: int) -> torch.Tensor:
    return sums.to(torch.float64) * 2.0 ** (exponent - _fraction_bits(chunk))


def _column_norms_collect(chunk: Chunk, stats: Stats) -> dict[str, torch.Tensor]:
    """Wide: the column Gram matrices; else the squares of mergekit's column norms."""
    if chunk.wide:
        return _columns_collect(chunk, stats)
    return {"squares": _column_sums(chunk, [squares(v) for v in vectors(chunk, None)], 2 * stats["exponent"])}


def _column_norms_finish(totals: dict[str, torch.Tensor], chunk: Chunk, stats: Stats) -> Stats:
    if "squares" not in totals:
        return _columns_finish(totals, chunk, stats)
    sums = _column_values(totals["squares"], chunk, 2 * stats["exponent"])
    return {**stats, "norms": [as_norm(s, chunk.models[0].dtype).clamp(min=1e-7) for s in sums]}


_UNIT_EXPONENT = 1  # products of unit vectors' entries stay below 2 in magnitude, rounding included


def _column_cos_collect(chunk: Chunk, stats: Stats) -> dict[str, torch.Tensor]:
    u0, u1 = (v / n for v, n in zip(vectors(chunk, None), stats["norms"]))
    return {"dot": _column_sums(chunk, [u0 * u1], _UNIT_EXPONENT)}


def _column_cos_finish(totals: dict[str, torch.Tensor], chunk: Chunk, stats: Stats) -> Stats:
    dot = as_sum(_column_values(totals["dot"][0], chunk, _UNIT_EXPONENT), chunk.models[0].dtype)
    return {**stats, "cos": dot.clamp(-1, 1).reshape(chunk.shape[1:])}


# vectors along dim 0 span every chunk: column sums as fixed-point integers, exact under addition
_FIRST_DIM = (StatPass(_exponent_collect, _exponent_finish),
              StatPass(_column_norms_collect, _column_norms_finish),
              StatPass(_column_cos_collect, _column_cos_finish, when=lambda stats: "norms" in stats))


def _passes(params: TensorParams) -> tuple[StatPass, ...]:
    g = params.globals
    if g["nuslerp_row_wise"] and not g["nuslerp_flatten"]:
        return _FIRST_DIM
    return _WHOLE  # without flatten only 1-D tensors are one vector


def _pair_gram(chunk: Chunk, stats: Stats) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The [2, 2, ...] inner products of the two vectors of each slerp, and the shape that their
    coefficients take to broadcast against the chunk."""
    layout = _layout(chunk)
    if layout == "whole":
        return stats["gram"], ()
    if layout == "first":
        return stats["gram"], chunk.shape[1:]
    v0, v1 = (v.reshape(-1, chunk.shape[-1]) for v in vectors(chunk))
    return pairwise([v0, v1], lambda p: p.sum(1)), (chunk.row_stop - chunk.row_start, *chunk.shape[1:-1], 1)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)


def _mergekit_nuslerp(chunk: Chunk, stats: Stats, t: float) -> torch.Tensor:
    """mergekit's steps in the compute dtype; cos θ from the statistics passes for a whole-tensor
    vector or vectors along dim 0, else from the chunk's own rows (vectors along the last dim lie
    inside a row)."""
    base = chunk.base
    v0, v1 = chunk.models if base is None else (x - base for x in chunk.models)
    if "cos" in stats:
        cos = stats["cos"]
    else:
        cos = torch.sum(_unit(v0) * _unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= 1e-16
    theta = torch.acos(torch.where(colinear, 0, cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    return out if base is None else base + out


def nuslerp_merge(chunk: Chunk, stats: Stats) -> torch.Tensor:
    """out = (sin((1−t)θ)·v0 + sin(tθ)·v1) / sin θ, t = w1/(w0+w1) (0.5 when |w0+w1| < 1e-6),
    cos θ = ⟨v0, v1⟩ / (max(‖v0‖, 1e-7)·max(‖v1‖, 1e-7)); lerp (1−t)·v0 + t·v1 where |sin θ| < 1e-8.
    v0, v1 are the models, or their task vectors with the base added back. Vectors: the whole
    tensor (``nuslerp_flatten``), else along the last dim, or along dim 0 with ``nuslerp_row_wise``.

    mergekit's NuSLERP (docs/merge_methods.md); Shoemake, SIGGRAPH 1985.
    """
    w0, w1 = chunk.params.per_model("weight")
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    if not chunk.wide:
        return _mergekit_nuslerp(chunk, stats, t)
    g, shape = _pair_gram(chunk, stats)
    cos = g[0, 1] / (g[0, 0].sqrt().clamp_min(1e-7) * g[1, 1].sqrt().clamp_min(1e-7))
    theta = cos.clamp(-1, 1).acos()
    sin = theta.sin()
    parallel = sin.abs() < 1e-8
    s0 = torch.where(parallel, 1 - t, ((1 - t) * theta).sin() / sin)
    s1 = torch.where(parallel, t, (t * theta).sin() / sin)
    return combine(chunk, [s0.reshape(shape), s1.reshape(shape)])


register(
    MergeMethod(
        name="nuslerp",
        merge=nuslerp_merge,
        params=(
            Param("weight", float, required=True, per_model=True, doc="relative weight of the model: t = w2 / (w1 + w2)"),
            Param("nuslerp_flatten", bool, default=True, doc="slerp each tensor as one vector"),
            Param("nuslerp_row_wise", bool, default=False, doc="without flatten: slerp along dim 0 (a matrix's columns) instead of the last dim"),
        ),
        base="optional",
        precision="load",
        paper="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
        passes=_passes,
        min_models=2,
        max_models=2,
    )
)
