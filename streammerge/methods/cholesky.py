"""Cholesky factors of the float32 Gram matrices data-aware methods solve with, in place."""

from __future__ import annotations

import torch


def cholesky_in_place(matrix: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The lower Cholesky factor L of a symmetric float32 matrix, written over it: (L, LAPACK's
    info, 0 when positive definite). L is the matrix's transposed view, column-major as LAPACK
    writes it; factoring the row-major view copied the whole matrix (462 MiB for a 7B down_proj)."""
    factor = matrix.mT
    info = torch.empty((), dtype=torch.int32)
    torch.linalg.cholesky_ex(factor, out=(factor, info))
    return factor, int(info)
