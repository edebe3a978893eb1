"""Embedding rows re-indexed to an output vocabulary, read a row chunk at a time.

A ``RowMap`` says where each output row of one input comes from: a row of the input's own tensor,
else a fill (the mean of rows of other inputs' tensors, or zero), and past the vocabulary
(``pad_to_multiple_of`` rows) the mean of the input's re-indexed vocabulary rows. Reads gather the
needed rows in runs of consecutive rows, so memory stays one chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from streammerge.io.reader import Checkpoint

Fill = tuple[tuple[int, str, int], ...]  # (checkpoint, tensor, row) rows whose mean fills a row; () is zero
_PAD_BLOCK_ELEMENTS = 1 << 22  # rows summed at a time for the padding mean


@dataclass(frozen=True, eq=False)
class RowMap:
    own: torch.Tensor  # int64 per output row: the row of this input's tensor, or -1
    fills: Mapping[int, Fill]  # the output rows below ``vocab`` with own -1
    vocab: int  # rows from here on are padding
    _pad: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)  # the padding row, once computed


def read_rows(ckpt: Checkpoint, tensor: str, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` (any order, repeats allowed) of a tensor, read as runs of consecutive rows."""
    wanted = torch.unique(rows)
    cuts = (torch.nonzero(wanted[1:] - wanted[:-1] != 1).flatten() + 1).tolist()
    starts = [0, *cuts]
    ends = [*cuts, len(wanted)]
    block = torch.cat([ckpt.read(tensor, slice(int(wanted[a]), int(wanted[b - 1]) + 1)) for a, b in zip(starts, ends)])
    return block[torch.searchsorted(wanted, rows)]


def _mean(rows: Sequence[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """mergekit's fill: summed one by one in the working dtype, then divided by the count."""
    out = torch.zeros_like(like)
    for r in rows:
        out += r
    return out / len(rows) if rows else out


def read_mapped(checkpoints: Sequence[Checkpoint], checkpoint: int, tensor: str, row_map: RowMap, start: int, stop: int,
                dtype: torch.dtype) -> torch.Tensor:
    """Output rows [start, stop) of one input's ``tensor`` re-indexed by ``row_map``, in ``dtype``."""
    ckpt = checkpoints[checkpoint]
    out = torch.empty((stop - start, *ckpt.tensors[tensor].shape[1:]), dtype=dtype)
    own = row_map.own[start:stop]
    have = own >= 0
    if bool(have.any()):
        out[have] = read_rows(ckpt, tensor, own[have]).to(dtype)
    for r in torch.nonzero(~have).flatten().tolist():
        row = start + r
        if row >= row_map.vocab:
            out[r] = _pad_row(checkpoints, checkpoint, tensor, row_map, dtype)
        else:
            rows = [checkpoints[c].read(t, slice(p, p + 1))[0].to(dtype) for c, t, p in row_map.fills[row]]
            out[r] = _mean(rows, out[r])
    return out


def _pad_row(checkpoints: Sequence[Checkpoint], checkpoint: int, tensor: str, row_map: RowMap, dtype: torch.dtype) -> torch.Tensor:
    """The mean of the input's re-indexed vocabulary rows (mergekit's value for padding rows),
    summed in float64 in fixed blocks, so it does not depend on the chunking."""
    if dtype not in row_map._pad:
        row_shape = checkpoints[checkpoint].tensors[tensor].shape[1:]
        block = max(1, _PAD_BLOCK_ELEMENTS // max(1, math.prod(row_shape)))
        total = torch.zeros(row_shape, dtype=torch.float64)
        for a in range(0, row_map.vocab, block):
            b = min(a + block, row_map.vocab)
            total += read_mapped(checkpoints, checkpoint, tensor, row_map, a, b, dtype).to(torch.float64).sum(0)
        row_map._pad[dtype] = (total / row_map.vocab).to(dtype)
    return row_map._pad[dtype]
