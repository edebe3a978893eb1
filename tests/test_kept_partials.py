"""The per-chunk partials a statistics pass keeps: copied whole, out of glibc's heap."""

from __future__ import annotations

import ctypes
import ctypes.util
import subprocess
import sys

import pytest
import torch

from streammerge.methods.base import StatPass, _Kept, run_passes


def test_kept_partials_are_equal_copies_in_the_same_structure() -> None:
    kept = _Kept()
    small = torch.arange(10, dtype=torch.int64)
    flag = torch.tensor(True)
    strided = torch.randn(3, 4).t()
    large = torch.zeros(_Kept.BLOCK // 2, dtype=torch.uint8)
    part = {"x": [small, None, (flag, strided)], "n": 3, "big": large}
    out = kept.keep(part)
    assert out["n"] == 3 and out["x"][1] is None and isinstance(out["x"][2], tuple)
    for got, want in [(out["x"][0], small), (out["x"][2][0], flag), (out["x"][2][1], strided)]:
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
        assert got.untyped_storage().data_ptr() != want.untyped_storage().data_ptr()
    assert out["big"] is large  # large partials are not what splits the heap: left where they are
    small.add_(1)
    assert torch.equal(out["x"][0], torch.arange(10))


def test_a_pass_gets_its_partials_in_order_across_blocks() -> None:
    """Enough partials to fill several blocks: ``finish`` sees every one, unchanged, in chunk order."""
    rows = [torch.full((300_000,), i, dtype=torch.int32) for i in range(20)]  # 1.2 MB each: 3 to a block
    seen = {}

    def finish(totals: dict, chunk: object, stats: dict) -> dict:
        seen["parts"] = totals["part"]
        return {}

    run_passes([StatPass(lambda c, s: {"part": c.clone()}, finish, per_chunk=True)], lambda: rows)
    assert len(seen["parts"]) == 20
    assert all(torch.equal(p, r) for p, r in zip(seen["parts"], rows))


_HEAP_GROWTH = """
import ctypes, ctypes.util, sys
import torch
from streammerge.engine import _reuse_freed_memory
from streammerge.methods.base import _Kept

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                              "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
libc.mallinfo2.restype = MallInfo2
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
with _reuse_freed_memory():
    start, kept, parts = libc.mallinfo2().arena, _Kept(), []
    for i in range(300):
        x = torch.randn(700_000 - (i % 7) * 10_000, generator=g).to(torch.bfloat16)
        keys = (x * 2).abs().view(torch.int16)
        hist = torch.bincount(keys, minlength=1 << 15)
        present = hist.nonzero().reshape(-1)
        part = (present.to(torch.int32), hist[present])
        parts.append(kept.keep(part) if sys.argv[1] == "kept" else part)
        del x, keys, hist, present
    print(libc.mallinfo2().arena - start)
"""


@pytest.mark.skipif(not hasattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "mallinfo2"),
                    reason="glibc's heap only")
def test_kept_histograms_do_not_grow_the_heap_between_chunk_temporaries() -> None:
    """A TIES-like pass: per chunk, large temporaries and a small histogram that outlives them.
    Kept in the heap the histograms split the temporaries' holes and the heap grows (each way in
    a fresh process: a heap grown once is reused)."""
    def growth(how: str) -> int:
        out = subprocess.run([sys.executable, "-c", _HEAP_GROWTH, how], capture_output=True, text=True, check=True)
        return int(out.stdout.strip())

    assert growth("kept") < growth("plain") / 2
