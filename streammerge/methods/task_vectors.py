"""Task vectors and TIES's sign election, shared by every method that works on differences from a base."""

from __future__ import annotations

import torch

from streammerge.methods import float_bits
from streammerge.methods.base import Chunk, Stats


def task_vectors(chunk: Chunk, stats: Stats | None = None) -> list[torch.Tensor]:
    """δ_i = x_i − B for each model of the chunk (``stats`` unused: the signature of a selection's values)."""
    return [x - chunk.base for x in chunk.models]


def stacked_task_vectors(chunk: Chunk) -> torch.Tensor:
    """The task vectors stacked along a new first dimension: [N, ...]."""
    return torch.stack(task_vectors(chunk))


def sign_agreement(values: list[torch.Tensor]) -> list[torch.Tensor]:
    """TIES's 'sum' election, as ``float_bits`` masks: [sign v_i = elected] per model, elected = +1
    where Σ_i v_i >= 0, else −1; zeros never agree, so a pruned entry neither votes nor counts.
    Compared on sign bits: a sum of −0 only comes from zeros, which never agree anyway. (A NaN
    votes with its sign bit, so with ``allow_nonfinite`` it reaches the result.)"""
    total = sum_models(values)
    return [float_bits.agrees(v, total) for v in values]


def sum_models(values: list[torch.Tensor]) -> torch.Tensor:
    """Σ_i values[i], rounded as ``torch.stack(values).sum(0)`` rounds: half-precision values
    accumulate in float32 and round once (for two, that is one half-precision add)."""
    if len(values) <= 2 or values[0].dtype not in (torch.bfloat16, torch.float16):
        total = values[0].clone() if len(values) == 1 else values[0] + values[1]
        for v in values[2:]:
            total += v
        return total
    total = values[0].float()
    for v in values[1:]:
        total += v
    return total.to(values[0].dtype)
