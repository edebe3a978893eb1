"""RegMean: the merged linear weight that best reproduces every model's outputs on its own inputs.

Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023
(arXiv:2212.09849). For a linear weight W (out × in) with model i's input Gram G_i = X_iᵀX_i / n:

    G̃_i = α·G_i + (1 − α)·diag(G_i)                    (``alpha``: off-diagonals shrunk)
    W*ᵀ = (Σ_i w_i G̃_i)⁻¹ (Σ_i w_i G̃_i W_iᵀ)           (``weight`` w_i per model, default 1)

Every other tensor (no statistics: embeddings, norms, the head) is Σ w_i θ_i / Σ w_i.

Rows of W* are independent: with A = Σ_i w_i G̃_i and M_i = w_i G̃_i (Σ M_i = A),
W*[rows] = (Σ_i W_i[rows] M_i) A⁻¹ = W_1[rows] + Σ_{i>1} (W_i − W_1)[rows] N_i with N_i = M_i A⁻¹,
prepared once per tensor: a row chunk needs N_2..N_N (N − 1 matrices of [in, in]) and acts on
the models' differences, which float32 resolves best. N_i is solved with A's Cholesky factor in
float32 (no explicit inverse: torch's cholesky_inverse took 31 s for a 4096-wide A on two cores,
the solve 3 s); when the factorization fails or the factor's diagonal spans more than
``ILL_CONDITIONED`` in condition (a lower bound of A's), the pseudo-inverse A⁺ stands for A⁻¹ and
a note names the tensor. (Where A is singular, no model's inputs reach those directions; A⁺ leaves W_1 there.)
The products run on blocks of ``ROW_BLOCK`` rows on the tensor's row grid, padded with zeros,
so a row's arithmetic never depends on the chunk it came in.
"""

from __future__ import annotations

import torch

from streammerge.methods.base import (Chunk, MergeMethod, Param, Statistics, Stats, TensorParams,
                                      TensorStatistics)
from streammerge.methods.cholesky import cholesky_in_place
from streammerge.methods.registry import register

ILL_CONDITIONED = 1e7  # about 1 / float32's epsilon: past it a float32 solve keeps no digit
ROW_BLOCK = 16
SOLVE_COLUMNS = 1024  # columns of M_i solved at once


def weighted_average(chunk: Chunk) -> torch.Tensor:
    """Σ_i w_i θ_i / Σ_i w_i (tensors the data-aware methods have no statistics for)."""
    weights = chunk.params.per_model("weight")
    out = torch.zeros_like(chunk.models[0])
    for x, w in zip(chunk.models, weights):
        out.add_(x, alpha=w)
    return out.div_(sum(weights))


def _shrunk(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """G̃ = α G + (1 − α) diag(G), in place: the diagonal stays, the rest scales by α."""
    diagonal = gram.diagonal().clone()
    gram.mul_(alpha).diagonal().copy_(diagonal)
    return gram


def _prepare(params: TensorParams, stats: TensorStatistics) -> tuple[dict[str, torch.Tensor], ...]:
    """Models 2..N: N_i = M_i A⁻¹ (model 1 needs nothing)."""
    alpha, weights = params.globals["alpha"], params.per_model("weight")

    def m(i: int) -> torch.Tensor:
        return _shrunk(stats.read(i, "gram"), alpha).mul_(weights[i])

    kept = [m(i) for i in range(1, len(weights))]
    a = m(0)
    for k in kept:
        a += k
    factor, info = cholesky_in_place(a)  # A itself is not needed once factored
    diagonal = factor.diagonal()
    if info == 0 and float(diagonal.max() / diagonal.min()) ** 2 <= ILL_CONDITIONED:
        def solved(k: torch.Tensor) -> torch.Tensor:
            """M_i A⁻¹ = (A⁻¹ M_i)ᵀ (M_i and A symmetric), A⁻¹ = L⁻ᵀ L⁻¹, solved a block of columns
            at a time over M_i: one [in, in] matrix per model. (torch.cholesky_solve gives the same
            bits but copies the factor at every call: 462 MiB for a 7B down_proj.)"""
            for j0 in range(0, k.shape[1], SOLVE_COLUMNS):
                block = k[:, j0 : j0 + SOLVE_COLUMNS]
                half = torch.linalg.solve_triangular(factor, block, upper=False)
                block.copy_(torch.linalg.solve_triangular(factor.mT, half, upper=True))
            return k.T
    else:
        a = m(0)  # factoring overwrote A: rebuilt
        for k in kept:
            a += k
        inverse = torch.linalg.pinv(a, hermitian=True)
        del a
        stats.note(f"tensor {stats.name!r}: regmean's Σ w_i G̃_i is ill-conditioned: "
                   "solved with its pseudo-inverse")

        def solved(k: torch.Tensor) -> torch.Tensor:
            return k @ inverse
    return ({}, *({"solved_gram": solved(kept.pop(0))} for _ in range(len(kept))))


def _rows_matmul(x: torch.Tensor, m: torch.Tensor, row_start: int) -> torch.Tensor:
    """x @ m, x holding rows [row_start, row_start + len(x)) of a tensor, computed on the blocks of
    ``ROW_BLOCK`` rows of the tensor's row grid, each padded with zero rows to a whole block: BLAS
    picks its kernels by shape, so every row is computed by the same kernel at the same place."""
    out = torch.empty(x.shape[0], m.shape[1], dtype=x.dtype, device=x.device)
    block = torch.zeros(ROW_BLOCK, x.shape[1], dtype=x.dtype, device=x.device)
    at = 0
    while at < x.shape[0]:
        offset = (row_start + at) % ROW_BLOCK
        n = min(ROW_BLOCK - offset, x.shape[0] - at)
        if n == ROW_BLOCK:
            out[at : at + n] = x[at : at + n] @ m
        else:
            block.zero_()[offset : offset + n] = x[at : at + n]
            out[at : at + n] = (block @ m)[offset : offset + n]
        at += n
    return out


def _memory(params: TensorParams, shape: tuple[int, ...], n: int) -> int:
    """N matrices of [in, in] and a block of columns at the peak of ``_prepare`` (A factored in
    place, M_2..M_N, each N_i solved over its M_i); the pseudo-inverse's eigendecomposition takes
    about three more."""
    cols = shape[1] if len(shape) == 2 else 0
    return 4 * cols * (cols * n + 2 * min(cols, SOLVE_COLUMNS))


def regmean_merge(chunk: Chunk, stats: Stats) -> torch.Tensor:
    """W*[rows] = W_1[rows] + Σ_{i>1} (W_i − W_1)[rows] N_i; the weighted average elsewhere."""
    if not chunk.calibration:
        return weighted_average(chunk)
    first = chunk.models[0]
    out = first.clone()
    for w, c in zip(chunk.models[1:], chunk.calibration[1:]):
        out += _rows_matmul(w - first, c["solved_gram"].to(first.dtype), chunk.row_start)
    return out


register(
    MergeMethod(
        name="regmean",
        merge=regmean_merge,
        params=(
            Param("weight", float, default=1.0, per_model=True, low=0.0, low_open=True,
                  doc="the model's weight w_i (scales its G̃_i)"),
            Param("alpha", float, default=0.9, low=0.0, high=1.0, doc="G̃ = α G + (1 − α) diag(G)"),
        ),
        base="model",
        precision="float32",
        paper="arXiv:2212.09849",
        statistics=Statistics(lambda params: frozenset({"gram"}), _prepare, _memory),
        doc="linear weights solving Σ_i ‖X_i W − X_i W_i‖² with shrunk Grams; other tensors "
            "averaged (Jin et al., ICLR 2023)",
    )
)
