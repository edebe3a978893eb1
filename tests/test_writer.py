"""ShardWriter: the bytes land where they belong whatever the offsets, whole blocks past the page
cache and the partial ones at a write's ends through it; written through the cache where the
filesystem refuses direct writes."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest
import torch

from page_cache import cached_fraction
from streammerge.io.writer import ShardWriter

HEADER = b"{" + b" " * 997 + b"}"  # an odd length: no tensor starts on a block boundary


def _pieces(rng: random.Random, total: int) -> list[tuple[int, int]]:
    """(offset, length) covering [0, total): tiny pieces, pieces inside one block, pieces of
    whole blocks, and pieces longer than the writer's 4 MiB aligned buffer."""
    pieces, at = [], 0
    while at < total:
        n = min(total - at, rng.choice([1, 7, 100, 4096, 4096 * 3, 5000, 65_537, (4 << 20) + 12_345]))
        pieces.append((at, n))
        at += n
    return pieces


@pytest.mark.parametrize("order", ["in order", "shuffled"])
def test_every_byte_lands_at_its_offset(tmp_path: Path, order: str) -> None:
    """Pieces written in file order (as a merge writes) or in any order (a resumed run rewriting a
    tensor next to ones already written) give the bytes an in-memory copy holds; the pieces' whole
    blocks did not pass through the page cache."""
    rng = random.Random(order)
    data = torch.randint(0, 256, (12 << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    pieces = _pieces(rng, len(data))
    if order == "shuffled":
        rng.shuffle(pieces)
    path = tmp_path / "shard.safetensors"
    writer = ShardWriter(path, HEADER, len(HEADER) + len(data))
    for at, n in pieces:
        writer.write(len(HEADER) + at, data[at:at + n])
    assert writer.writes_direct  # ext4, xfs and tmpfs since Linux 6.6 take them
    assert cached_fraction(path, len(HEADER), len(data)) < 0.05
    # consecutive pieces: their running hash; shuffled ones: read back, partial blocks included
    assert writer.sha256(len(HEADER), len(data)) == hashlib.sha256(data.numpy()).hexdigest()
    writer.close()
    assert path.read_bytes() == HEADER + data.numpy().tobytes()


def test_a_filesystem_that_refuses_direct_writes_gets_them_through_the_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused at open, or at the first write (EINVAL): the same bytes, every one through the cache."""
    data = torch.randint(0, 256, (3 << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    real_open, real_pwrite = os.open, os.pwrite
    for refuse in ("open", "write"):
        direct: set[int] = set()

        def refuse_open(file, flags, *args):
            if flags & os.O_DIRECT and refuse == "open":
                raise OSError(22, "Invalid argument")
            fd = real_open(file, flags, *args)
            if flags & os.O_DIRECT:
                direct.add(fd)
            return fd

        def refuse_write(fd, data, offset):
            if fd in direct:
                raise OSError(22, "Invalid argument")
            return real_pwrite(fd, data, offset)

        path = tmp_path / f"{refuse}.safetensors"
        with monkeypatch.context() as m:
            m.setattr(os, "open", refuse_open)
            m.setattr(os, "pwrite", refuse_write)
            writer = ShardWriter(path, HEADER, len(HEADER) + len(data))
            for at in range(0, len(data), 1 << 20):
                writer.write(len(HEADER) + at, data[at:at + (1 << 20)])
            assert not writer.writes_direct
            writer.close()
        assert path.read_bytes() == HEADER + data.numpy().tobytes(), refuse
