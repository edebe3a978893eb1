"""torch's whole-tensor reductions in a tensor's own dtype, from chunk-exact float64 partial sums.

Under ``compute_dtype: auto`` methods follow mergekit's arithmetic, where a norm, sum or mean over a
whole tensor is one torch reduction: half-precision inputs accumulate in float32 and round once to
their dtype, float32 ones accumulate in float32. Statistics passes add float64 per-row partials of
the same terms (exact under chunking); rounding their total to float32 and then to the dtype gives
torch's result except where torch's own float32 accumulation error crosses a rounding boundary:
rare for half dtypes, a few float32 ulp of the statistic for float32 tensors.
"""

from __future__ import annotations

import torch


def _accumulated(total: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return total.to(torch.float64 if dtype == torch.float64 else torch.float32)


def as_sum(total: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.sum()`` in ``dtype``, given the float64 sum of the (``dtype``-rounded) terms."""
    return _accumulated(total, dtype).to(dtype)


def as_norm(squares: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``torch.norm(x)`` in ``dtype``, given the float64 sum of x² (exact for half and float32 x)."""
    return _accumulated(squares, dtype).sqrt().to(dtype)


def as_mean(total: torch.Tensor, count: int, dtype: torch.dtype) -> torch.Tensor:
    """``x.mean()`` in ``dtype``, given the float64 sum of the (``dtype``-rounded) terms."""
    return (_accumulated(total, dtype) / count).to(dtype)


def squares(x: torch.Tensor) -> torch.Tensor:
    """x² as torch's norm squares it (in the float32 accumulator for half and float32 tensors), in
    float64 for exact partial sums."""
    return _accumulated(x, x.dtype).square().to(torch.float64)
