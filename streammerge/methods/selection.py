"""Exact k-th largest magnitude over a tensor seen in row chunks, without sorting it.

Magnitudes are compared as integer keys that order like |x|: the bits of a bfloat16 |x| (16-bit
keys), else of |x| widened to float32 (32-bit keys).

16-bit keys take one pass: a histogram of all 2¹⁵ keys per chunk, kept as its non-empty bins,
finds the k-th largest exactly. That costs less than a sample pass, which reads the whole tensor
once more for a strided sample. 32-bit keys use a sample-guided bracket (Floyd–Rivest):

1. A strided sample of the keys (stride coprime with the row length, so it crosses every column)
   predicts where the k-th largest lies; a band of ±4σ sample ranks around that is chosen.
2. One pass counts, per chunk, the keys above the band and the distinct keys inside it (a few
   percent of the tensor). If the k-th largest is in the band it is found exactly there.
3. Otherwise (a sample that misleads, never seen on real weights) a radix select on the key bits
   finds it exactly: a histogram of the top 16 bits, then of the low 16 inside the chosen bucket.

Exactly k elements are kept: those above the threshold, then elements equal to it in flat-index
order. Every count is an integer kept per chunk, so nothing depends on the chunking, and only the
one chunk where the equal elements run out needs a running count.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

import torch

from streammerge.methods import float_bits
from streammerge.methods.base import Chunk, StatPass, Stats

SAMPLE_SIZE = 1 << 18
_BAND_SIGMAS = 4.0
_HI_BINS = 1 << 15  # keys are non-negative: the sign bit is always 0
_LO_BINS = 1 << 16

Values = Callable[[Chunk, Stats], list[torch.Tensor]]
Counts = Callable[[Chunk, Stats], list[int | None]]  # k may depend on earlier passes
# Per model wanted, the 2¹⁵-bin histogram of the 16-bit keys of the values, computed without forming
# them (a compiled kernel); None where it cannot, and the values are formed and counted instead.
Histograms = Callable[[Chunk, Stats, list[bool]], list[torch.Tensor | None] | None]


def magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    """Flat integer keys that order like |x|: int16 for bfloat16, else int32 of |x| as float32."""
    a = x.abs().contiguous()
    return a.view(torch.int16).reshape(-1) if a.dtype == torch.bfloat16 else a.to(torch.float32).view(torch.int32).reshape(-1)


def key_value(key: int, bits: int) -> float:
    """The magnitude a key stands for (``bits``: 16 or 32, the key width)."""
    if bits == 16:  # a host scalar whatever the device: only its bits are reinterpreted
        return torch.tensor(key, dtype=torch.int16, device="cpu").view(torch.bfloat16).item()
    return torch.tensor(key, dtype=torch.int32, device="cpu").view(torch.float32).item()


def _stride(chunk: Chunk) -> int:
    row = chunk.numel // chunk.total_rows if chunk.total_rows else 1
    s = max(1, chunk.numel // SAMPLE_SIZE)
    while s > 1 and math.gcd(s, row) != 1:
        s += 1
    return s


def _from_top(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest element, and how many elements lie in higher bins."""
    at_or_above = hist.flip(0).cumsum(0).flip(0)  # at_or_above[b] = count in bins >= b
    b = int(torch.nonzero(at_or_above >= k).max())
    above = int(at_or_above[b + 1]) if b + 1 < len(hist) else 0
    return b, above


def _key_counts(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct keys, ascending, and how often each occurs."""
    if keys.dtype == torch.int16:  # 2¹⁵ possible keys (|x| has no sign bit): a histogram costs less than sorting
        return _present(torch.bincount(keys, minlength=_HI_BINS))
    return torch.unique(keys.to(torch.int32), return_counts=True)


def _present(hist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys a histogram counts, ascending, and their counts."""
    present = hist.nonzero().reshape(-1)
    return present.to(torch.int32), hist[present]


def _found(threshold: int, keep_equal: int, equal_here: list[int], row_starts: list[int]) -> dict:
    before = [sum(equal_here[:c]) for c in range(len(equal_here))]
    return {"threshold": threshold, "keep_equal": keep_equal,
            "equal_before": dict(zip(row_starts, before)), "equal_here": dict(zip(row_starts, equal_here))}


def top_k_passes(values: Values, counts: Counts, key: str, elementwise: bool = False,
                 histograms: Histograms | None = None) -> tuple[StatPass, ...]:
    """Passes that find, per model, the threshold keeping exactly ``counts(chunk, stats)[i]`` elements of
    ``values(chunk)[i]`` by magnitude (``None`` = keep all). Results live in ``stats[key]``.
    ``elementwise``: each value depends only on the inputs at its own position, so the sample's
    values are computed from the sampled inputs alone. ``histograms``: counts the 16-bit keys itself."""

    def first_collect(chunk: Chunk, stats: Stats) -> dict:
        """16-bit keys: every key, counted (the band is all of them). 32-bit keys: the sample."""
        if histograms is not None and chunk.models[0].dtype == torch.bfloat16:
            wanted = [k is not None for k in counts(chunk, stats)]
            hists = histograms(chunk, stats, wanted)
            if hists is not None:
                inside = [None if h is None else _present(h) for h in hists]
                return {"above": [0] * len(wanted), "inside": inside, "row_start": chunk.row_start}
        s = _stride(chunk)
        first = -chunk.element_start % s  # the flat indices ≡ 0 mod s, whatever the chunking
        if elementwise:
            base = None if chunk.base is None else chunk.base.reshape(-1)[first::s]
            sampled = replace(chunk, loaded_base=base, compute_dtype=None,
                              loaded_models=[x.reshape(-1)[first::s] for x in chunk.models])
            keys = [magnitude_keys(v) for v in values(sampled, stats)]
            if keys[0].dtype != torch.int16:
                return {"sample": keys}
        vals = values(chunk, stats)
        if vals[0].dtype == torch.bfloat16:
            counted = [None if k is None else _key_counts(magnitude_keys(v)) for v, k in zip(vals, counts(chunk, stats))]
            return {"above": [0] * len(vals), "inside": counted, "row_start": chunk.row_start}
        return {"sample": [magnitude_keys(v.reshape(-1)[first::s]) for v in vals]}

    def sample_finish(totals: dict, chunk: Chunk, stats: Stats) -> Stats:
        ks, n, exhaustive = counts(chunk, stats), chunk.numel, _stride(chunk) == 1
        bands = []
        for i, k in enumerate(ks):
            sample = torch.cat([part[i] for part in totals["sample"]]).to(torch.int32).sort(descending=True).values
            if k is None:
                bands.append(None)
                continue
            m = len(sample)
            at = k * m / n
            margin = 0.0 if exhaustive else _BAND_SIGMAS * math.sqrt(m) + 2
            hi_rank, lo_rank = math.floor(at - margin) - 1, math.ceil(at + margin) - 1
            bands.append((int(sample[lo_rank]) if lo_rank < m else 0, int(sample[hi_rank]) if hi_rank >= 0 else None))
        return {**stats, key: {"k": ks, "bits": 32, "band": bands}}

    def first_finish(totals: dict, chunk: Chunk, stats: Stats) -> Stats:
        if "sample" in totals:
            return sample_finish(totals, chunk, stats)
        return band_finish(totals, chunk, {**stats, key: {"k": counts(chunk, stats), "bits": 16}})

    def band_collect(chunk: Chunk, stats: Stats) -> dict:
        """Per model: how many keys lie above the band, and the distinct keys inside it with their
        counts (weights quantized to few values tie heavily: counts stay small where keys would not)."""
        above, inside = [], []
        for v, band in zip(values(chunk, stats), stats[key]["band"]):
            if band is None:
                above.append(0), inside.append(None)
                continue
            keys, (lo, hi) = magnitude_keys(v), band
            above.append(0 if hi is None else int(torch.count_nonzero(keys > hi)))
            inside.append(_key_counts(keys[keys >= lo] if hi is None else keys[(keys >= lo) & (keys <= hi)]))
        return {"above": above, "inside": inside, "row_start": chunk.row_start}

    def band_finish(totals: dict, chunk: Chunk, stats: Stats) -> Stats:
        sel = stats[key]
        found = []
        for i, k in enumerate(sel["k"]):
            above = sum(part[i] for part in totals["above"])
            if k is None:
                found.append(None)
                continue
            parts = [part[i] for part in totals["inside"]]
            keys, where = torch.unique(torch.cat([u for u, _ in parts]), return_inverse=True)
            counts = torch.zeros(len(keys), dtype=torch.int64, device=keys.device).index_add_(0, where, torch.cat([c for _, c in parts]))
            if not above < k <= above + int(counts.sum()):
                found.append("missed")
                continue
            at, above_t = _from_top(counts, k - above)  # keys ascend: bin order is key order
            t = int(keys[at])
            found.append(_found(t, k - above - above_t, [int(c[u == t].sum()) for u, c in parts], totals["row_start"]))
        return {**stats, key: {**sel, "found": found}}

    def banded(stats: Stats) -> bool:
        return "found" not in stats[key]

    def missed(stats: Stats) -> bool:
        return "missed" in stats[key]["found"]

    def hi_collect(chunk: Chunk, stats: Stats) -> dict:
        hists = []
        for v, f in zip(values(chunk, stats), stats[key]["found"]):
            keys = magnitude_keys(v)
            hists.append(torch.bincount(keys >> 16, minlength=_HI_BINS) if f == "missed" else None)
        return {"hi": hists, "row_start": chunk.row_start}

    def hi_finish(totals: dict, chunk: Chunk, stats: Stats) -> Stats:
        sel = stats[key]
        found = list(sel["found"])
        for i, (k, f) in enumerate(zip(sel["k"], found)):
            if f != "missed":
                continue
            bucket, above = _from_top(sum(part[i] for part in totals["hi"]), k)
            found[i] = ("bucket", bucket, above)
        return {**stats, key: {**sel, "found": found}}

    def lo_collect(chunk: Chunk, stats: Stats) -> dict:
        hists = []
        for v, f in zip(values(chunk, stats), stats[key]["found"]):
            if not (isinstance(f, tuple) and f[0] == "bucket"):
                hists.append(None)
                continue
            keys = magnitude_keys(v)
            hists.append(torch.bincount(keys[(keys >> 16) == f[1]] & 0xFFFF, minlength=_LO_BINS))
        return {"lo": hists, "row_start": chunk.row_start}

    def lo_finish(totals: dict, chunk: Chunk, stats: Stats) -> Stats:
        sel = stats[key]
        found = list(sel["found"])
        for i, (k, f) in enumerate(zip(sel["k"], found)):
            if not (isinstance(f, tuple) and f[0] == "bucket"):
                continue
            _, bucket, above = f
            per_chunk = [part[i] for part in totals["lo"]]
            lo, above_in_bucket = _from_top(sum(per_chunk), k - above)
            found[i] = _found((bucket << 16) | lo, k - above - above_in_bucket, [int(h[lo]) for h in per_chunk],
                              totals["row_start"])
        return {**stats, key: {**sel, "found": found}}

    def bucketed(stats: Stats) -> bool:
        return any(isinstance(f, tuple) for f in stats[key]["found"])

    return (StatPass(first_collect, first_finish, per_chunk=True),
            StatPass(band_collect, band_finish, per_chunk=True, when=banded),
            StatPass(hi_collect, hi_finish, per_chunk=True, when=missed),
            StatPass(lo_collect, lo_finish, per_chunk=True, when=bucketed))


def threshold_values(stats: Stats, key: str) -> list[float | None]:
    """Per model, the magnitude of the k-th largest element (None where all are kept)."""
    sel = stats[key]
    return [None if f is None else key_value(f["threshold"], sel["bits"]) for f in sel["found"]]


def top_k_mask(x: torch.Tensor, i: int, chunk: Chunk, stats: Stats, key: str) -> torch.Tensor:
    """Boolean mask (shape of ``x``) of the elements of model ``i`` the selection keeps."""
    f = stats[key]["found"][i]
    if f is None:
        return torch.ones_like(x, dtype=torch.bool)
    keys = magnitude_keys(x)
    thr = f["threshold"]
    remaining = f["keep_equal"] - f["equal_before"][chunk.row_start]
    if remaining >= f["equal_here"][chunk.row_start]:
        keep = float_bits.compare(torch.ge, keys, thr)
    else:
        keep = float_bits.compare(torch.gt, keys, thr)
        if remaining > 0:  # the chunk where the kept equal elements run out, in flat-index order
            eq = float_bits.compare(torch.eq, keys, thr)
            keep |= eq & (eq.cumsum(0) <= remaining)
    return keep.reshape(x.shape)
