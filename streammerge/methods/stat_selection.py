"""Exact top-k selection whose k is itself a statistic (a count found by an earlier pass).

``selection.top_k_passes`` reads k from the chunk alone; this wrapper computes k from the statistics
and hands it over in the chunk's parameters, under a name no plan can set.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch

from streammerge.methods.base import Chunk, StatPass, Stats, TensorParams
from streammerge.methods.selection import Values, top_k_passes

StatCounts = Callable[[Chunk, Stats], list[int | None]]


def stat_top_k_passes(values: Values, counts: StatCounts, key: str) -> tuple[StatPass, ...]:
    """``top_k_passes(values, counts, key)`` with ``counts(chunk, stats)``; results in ``stats[key]``."""
    hidden = f"_{key}_k"

    def wrap(p: StatPass) -> StatPass:
        def finish(totals: dict[str, torch.Tensor], chunk: Chunk, stats: Stats) -> Stats:
            params = TensorParams({**chunk.params.globals, hidden: counts(chunk, stats)}, chunk.params.models)
            return p.finish(totals, replace(chunk, params=params), stats)

        return StatPass(p.collect, finish)

    return tuple(wrap(p) for p in top_k_passes(values, lambda chunk: chunk.params.globals[hidden], key))
