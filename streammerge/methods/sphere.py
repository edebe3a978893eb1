"""Shared pieces of the spherical methods (nuslerp, multislerp, karcher).

Each of them returns a linear combination Σ_j c_j x_j of its inputs (task vectors when it has a
base) whose coefficients depend only on the inputs' inner products, so with an explicit compute
dtype one pass collecting the Gram matrix G_ij = ⟨x_i, x_j⟩ replaces any per-element state (a
running mean, an iterate). Under ``compute_dtype: auto`` each follows mergekit's elementwise steps
in the dtype instead, whose roundings no Gram matrix reproduces.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from streammerge.methods.base import Chunk, StatPass, Stats
from streammerge.methods.reductions import squares


def vectors(chunk: Chunk, dtype: torch.dtype | None = torch.float64) -> list[torch.Tensor]:
    """The inputs as ``[rows, -1]`` in ``dtype`` (None: the chunk's, as mergekit subtracts): task
    vectors x_i − base when the method has a base."""
    rows = chunk.row_stop - chunk.row_start
    base = 0 if chunk.base is None else chunk.base.to(dtype)
    return [(x.to(dtype) - base).reshape(rows, -1) for x in chunk.models]


def pairwise(xs: list[torch.Tensor], reduce: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``[n, n, ...]`` holding reduce(x_i · x_j) at [i, j], each pair computed once."""
    n = len(xs)
    done = {(i, j): reduce(xs[i] * xs[j]) for i in range(n) for j in range(i + 1)}
    return torch.stack([torch.stack([done[max(i, j), min(i, j)] for j in range(n)]) for i in range(n)])


def _gram_collect(chunk: Chunk, stats: Stats) -> dict[str, torch.Tensor]:
    return {"gram": chunk.per_row(pairwise(vectors(chunk), lambda p: p.sum(1)))}


def _gram_finish(totals: dict[str, torch.Tensor], chunk: Chunk, stats: Stats) -> Stats:
    return {**stats, **{key: rows.sum(-1) for key, rows in totals.items()}}  # nothing collected: stats unchanged


GRAM = StatPass(_gram_collect, _gram_finish)  # stats["gram"]: the n×n float64 Gram matrix of the whole tensor


def norms_collect(chunk: Chunk, stats: Stats) -> dict[str, torch.Tensor]:
    """Each input's squared norm as per-row partials in the chunk's dtype, as torch's norm sums them
    ("squares"); on a wide chunk, GRAM's Gram matrix instead."""
    if chunk.wide:
        return GRAM.collect(chunk, stats)
    return {"squares": chunk.per_row(torch.stack([squares(v).sum(1) for v in vectors(chunk, None)]))}


def combine(chunk: Chunk, coefs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_j c_j x_j in the compute dtype (x_j − base, and the base added back, when there is one);
    each c_j broadcasts against the chunk."""
    base = chunk.base
    out = sum(c.to(x.dtype) * (x if base is None else x - base) for c, x in zip(coefs, chunk.models))
    return out if base is None else base + out
