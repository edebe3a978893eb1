"""The per-chunk partials a statistics pass keeps: copied whole, out of glibc's heap."""

from __future__ import annotations

from pathlib import Path

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


def _heap_range() -> tuple[int, int]:
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith("[heap]"):
            lo, hi = line.split()[0].split("-")
            return int(lo, 16), int(hi, 16)
    raise AssertionError("no [heap] in /proc/self/maps")


def test_kept_partials_live_outside_the_heap() -> None:
    """Small tensors kept past their chunk sat in glibc's heap between the chunks' large temporaries
    and split their holes (a 4-layer ties merge: heap 0.6 GiB, 0.16 GiB live); kept copies do not."""
    kept, originals, copies = _Kept(), [], []
    for i in range(40):  # about 1 MB a block's worth several times over
        part = (torch.arange(3000 + i, dtype=torch.int32), torch.ones(3000 + i, dtype=torch.int64))
        originals.append(part)
        copies.append(kept.keep(part))
    lo, hi = _heap_range()
    assert all(lo <= t.data_ptr() < hi for part in originals for t in part)  # where they would have stayed
    assert not any(lo <= t.data_ptr() < hi for part in copies for t in part)
