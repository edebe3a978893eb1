"""Exact k-th largest magnitude over a tensor seen in row chunks, without sorting it.

A radix select on the float32 bit pattern of |x| (for non-negative floats the bit pattern orders
like the value): one pass counts the top 16 bits, a second counts the low 16 bits inside the bucket
that holds the k-th value, which gives it exactly. Exactly k elements are kept: those above the
threshold, then elements equal to it in flat-index order (a third pass counts them per row, and
runs only when the threshold value repeats). Every count is an integer, so nothing depends on the
chunking.
"""

from __future__ import annotations

from typing import Callable

import torch

from streammerge.methods.base import Chunk, StatPass, Stats

_HI_BINS = 1 << 15  # |x| is non-negative: the sign bit is always 0
_LO_BINS = 1 << 16

Values = Callable[[Chunk, Stats], list[torch.Tensor]]
Counts = Callable[[Chunk, Stats], list[int | None]]  # k may depend on earlier passes


def magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    """int32 keys that order like |x| (x is widened to float32 exactly for bf16/f16)."""
    return x.abs().to(torch.float32).contiguous().view(torch.int32).reshape(-1)


def _from_top(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest element, and how many elements lie in higher bins."""
    at_or_above = hist.flip(0).cumsum(0).flip(0)  # at_or_above[b] = count in bins >= b
    b = int(torch.nonzero(at_or_above >= k).max())
    above = int(at_or_above[b + 1]) if b + 1 < len(hist) else 0
    return b, above


def top_k_passes(values: Values, counts: Counts, key: str) -> tuple[StatPass, ...]:
    """Passes that find, per model, the threshold keeping exactly ``counts(chunk, stats)[i]`` elements of
    ``values(chunk)[i]`` by magnitude (``None`` = keep all). Results live in ``stats[key]``."""

    def hi_collect(chunk: Chunk, stats: Stats) -> dict[str, torch.Tensor]:
        return {"hi": torch.stack([torch.bincount(magnitude_keys(v) >> 16, minlength=_HI_BINS) for v in values(chunk, stats)])}

    def hi_finish(totals: dict[str, torch.Tensor], chunk: Chunk, stats: Stats) -> Stats:
        ks = counts(chunk, stats)
        found = [None if k is None else _from_top(totals["hi"][i], k) for i, k in enumerate(ks)]
        return {**stats, key: {"k": ks, "bucket": found}}

    def lo_collect(chunk: Chunk, stats: Stats) -> dict[str, torch.Tensor]:
        hists = []
        for v, found in zip(values(chunk, stats), stats[key]["bucket"]):
            if found is None:
                hists.append(torch.zeros(_LO_BINS, dtype=torch.int64))
                continue
            keys = magnitude_keys(v)
            hists.append(torch.bincount(keys[(keys >> 16) == found[0]] & 0xFFFF, minlength=_LO_BINS))
        return {"lo": torch.stack(hists)}

    def lo_finish(totals: dict[str, torch.Tensor], chunk: Chunk, stats: Stats) -> Stats:
        sel = stats[key]
        threshold, keep_equal, tiebreak = [], [], []
        for i, (k, found) in enumerate(zip(sel["k"], sel["bucket"])):
            if found is None:
                threshold.append(None), keep_equal.append(0), tiebreak.append(False)
                continue
            bucket, above = found
            lo, above_in_bucket = _from_top(totals["lo"][i], k - above)
            threshold.append((bucket << 16) | lo)
            keep_equal.append(k - above - above_in_bucket)
            tiebreak.append(int(totals["lo"][i][lo]) > keep_equal[-1])
        return {**stats, key: {**sel, "threshold": threshold, "keep_equal": keep_equal, "tiebreak": tiebreak}}

    def ties_collect(chunk: Chunk, stats: Stats) -> dict[str, torch.Tensor]:
        sel = stats[key]
        if not any(sel["tiebreak"]):
            return {}
        rows = []
        for v, thr, tb in zip(values(chunk, stats), sel["threshold"], sel["tiebreak"]):
            eq = (magnitude_keys(v) == thr) if tb else torch.zeros(v.numel(), dtype=torch.bool)
            rows.append(chunk.per_row(eq.reshape(chunk.row_stop - chunk.row_start, -1).sum(1)))
        return {"equal_rows": torch.stack(rows)}

    def ties_finish(totals: dict[str, torch.Tensor], chunk: Chunk, stats: Stats) -> Stats:
        if "equal_rows" not in totals:
            return stats
        equal_before = totals["equal_rows"].cumsum(1) - totals["equal_rows"]
        return {**stats, key: {**stats[key], "equal_before": equal_before}}

    return (StatPass(hi_collect, hi_finish), StatPass(lo_collect, lo_finish), StatPass(ties_collect, ties_finish))


def top_k_mask(x: torch.Tensor, i: int, chunk: Chunk, stats: Stats, key: str) -> torch.Tensor:
    """Boolean mask (shape of ``x``) of the elements of model ``i`` the selection keeps."""
    sel = stats[key]
    thr = sel["threshold"][i]
    if thr is None:
        return torch.ones_like(x, dtype=torch.bool)
    keys = magnitude_keys(x)
    keep = keys > thr
    if sel["tiebreak"][i]:
        eq = keys == thr
        rank = eq.cumsum(0) + int(sel["equal_before"][i][chunk.row_start])
        keep |= eq & (rank <= sel["keep_equal"][i])
    else:
        keep |= keys == thr
    return keep.reshape(x.shape)
