"""What the TIES family ranks task-vector entries by: |δ|, or an importance from calibration data.

For model i's task vector δ (out × in) of a linear weight, with model i's statistics of its inputs
x (one per calibration token):

    magnitude   s_rj = |δ_rj|                                   (today's TIES, breadcrumbs, DELLA)
    wanda       s_rj = |δ_rj| · sqrt(Σ_t x_tj²)                 (Sun et al., arXiv:2306.11695)
    sparsegpt   s_rj = δ_rj² / [(G + λI)⁻¹]_jj,  G = XᵀX / n,  λ = damp · mean(diag G)
                                                                (Frantar & Alistarh, arXiv:2301.00774)

sparsegpt's score is the OBS saliency with the diagonal of the full inverse: SparseGPT's own code
divides by the squared diagonal of the Cholesky factor of the inverse, which equals it only for
the first column, because it prunes column by column and updates the remaining weights; a one-shot
mask over a task vector has no such updates. Scores are float32. Each is a per-column vector times
a function of δ, so a row chunk's scores need only its rows and the vector, prepared once per
tensor: the selection over chunks stays exact, with magnitude's tie rule (equal scores: lower flat
index first). Tensors without statistics (embeddings, norms, the head) keep the magnitude ranking.
"""

from __future__ import annotations

import torch

from streammerge.errors import CheckpointError
from streammerge.methods.base import Chunk, Param, Statistics, TensorParams, TensorStatistics
from streammerge.methods.cholesky import cholesky_in_place

IMPORTANCE = Param("importance", str, default="magnitude", choices=("magnitude", "wanda", "sparsegpt"),
                   doc="rank entries by |δ|, or with calibration statistics by |δ|·‖x_j‖ or δ²/[H⁻¹]_jj")
DAMP = Param("damp", float, default=0.01, low=0.0, low_open=True,
             doc="sparsegpt: λ = damp · mean(diag G) added to G")
_KINDS = {"magnitude": frozenset(), "wanda": frozenset({"sqnorm"}), "sparsegpt": frozenset({"gram"})}
_BLOCK = 1024  # columns (and rows) of the inverse's Cholesky factor solved at once


def inverse_diagonal(gram: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """diag((G + λI)⁻¹), λ = damp · mean(diag G), overwriting ``gram`` (float32 [in, in]).

    With G + λI = L Lᵀ, (G + λI)⁻¹ = L⁻ᵀ L⁻¹, so its j-th diagonal entry is ‖L⁻¹ e_j‖². Columns
    [j0, j1) of L⁻¹ are zero above row j0; below, block forward substitution finds them a row block
    at a time (a triangular solve of the diagonal block, products with L's slices as they lie:
    torch's solve with L[j0:, j0:] copies that slice). Memory: L and [in, block] (float32)."""
    n = gram.shape[0]
    gram.diagonal().add_(damp * gram.diagonal().mean())
    factor, info = cholesky_in_place(gram)
    if info:
        raise CheckpointError(f"tensor {name!r}: its Gram matrix plus damping is not positive definite "
                              f"(pivot {info}); raise the damp parameter, or recompute the statistics")
    out = torch.empty(n, dtype=torch.float32)
    for j0 in range(0, n, _BLOCK):
        j1 = min(n, j0 + _BLOCK)
        inverse = torch.empty(n - j0, j1 - j0, dtype=torch.float32)  # rows j0.. of L⁻¹[:, j0:j1]
        for r0 in range(j0, n, _BLOCK):
            r1 = min(n, r0 + _BLOCK)
            if r0 == j0:
                rhs = torch.eye(j1 - j0, dtype=torch.float32)
            else:
                rhs = torch.mm(factor[r0:r1, j0:r0], inverse[: r0 - j0]).neg_()
            inverse[r0 - j0 : r1 - j0] = torch.linalg.solve_triangular(factor[r0:r1, r0:r1], rhs, upper=False)
        out[j0:j1] = inverse.square_().sum(0)
    return out


def _kinds(params: TensorParams) -> frozenset[str]:
    return _KINDS[params.globals["importance"]]


def _prepare(params: TensorParams, stats: TensorStatistics) -> tuple[dict[str, torch.Tensor], ...]:
    """Per model, the per-column vector its scores need: sqrt(Σ x²) or diag((G + λI)⁻¹)."""
    if params.globals["importance"] == "wanda":
        return tuple({"sqrt_sqnorm": stats.read(i, "sqnorm").sqrt_()} for i in range(len(params.models)))
    damp = params.globals["damp"]
    return tuple({"inverse_diagonal": stats.derived(i, "gram", ("inverse_diagonal", damp),
                                                    lambda gram: inverse_diagonal(gram, damp, stats.name))}
                 for i in range(len(params.models)))


def _memory(params: TensorParams, shape: tuple[int, ...], n: int) -> int:
    """One Gram factored in place, one block of its inverse, and n column vectors (float32)."""
    cols = shape[1] if len(shape) == 2 else 0
    if params.globals["importance"] == "sparsegpt":
        return 4 * (cols * cols + cols * min(cols, _BLOCK) + n * cols)
    return 4 * n * cols


STATISTICS = Statistics(_kinds, _prepare, _memory)


def ranked(params: TensorParams) -> bool:
    """Whether entries are ranked by an importance other than |δ|."""
    return params.globals["importance"] != "magnitude"


def score(chunk: Chunk, i: int, d: torch.Tensor) -> torch.Tensor:
    """What model i's task-vector chunk ``d`` is ranked by: its float32 importance where the tensor
    has statistics, else ``d`` itself (ranked by |d|)."""
    c = chunk.calibration[i] if chunk.calibration else {}
    if "sqrt_sqnorm" in c:
        return d.to(torch.float32).abs().mul_(c["sqrt_sqnorm"])
    if "inverse_diagonal" in c:
        return d.to(torch.float32).square().div_(c["inverse_diagonal"])
    return d
