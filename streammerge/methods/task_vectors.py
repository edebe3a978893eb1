"""Task vectors and TIES's sign election, shared by every method that works on differences from a base."""

from __future__ import annotations

import torch

from streammerge.methods.base import Chunk, Stats


def task_vectors(chunk: Chunk, stats: Stats | None = None) -> list[torch.Tensor]:
    """δ_i = x_i − B for each model of the chunk (``stats`` unused: the signature of a selection's values)."""
    return [x - chunk.base for x in chunk.models]


def stacked_task_vectors(chunk: Chunk) -> torch.Tensor:
    """The task vectors stacked along a new first dimension: [N, ...]."""
    return torch.stack(task_vectors(chunk))


def sign_agreement(values: torch.Tensor) -> torch.Tensor:
    """TIES's 'sum' election over dim 0: [sign v_i = elected], elected = +1 where Σ_i v_i >= 0, else −1;
    zeros never agree, so a pruned entry neither votes nor counts."""
    elected = (values.sum(0) >= 0).to(values.dtype) * 2 - 1
    return values.sign() == elected
