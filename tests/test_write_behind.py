"""The writer thread: order, copies, how much it holds, and errors."""

from __future__ import annotations

import threading

import pytest
import torch

from streammerge.io.write_behind import WriteBehind


def test_writes_run_in_order_on_copies() -> None:
    """The caller may overwrite its tensor as soon as ``write`` returns."""
    got: list[tuple[int, list[float]]] = []
    behind = WriteBehind(chunk_bytes=16, buffers=2)
    x = torch.zeros(4)
    for i in range(10):
        x.fill_(i)
        behind.write(lambda row, t: got.append((row, t.tolist())), i, x)
    behind.drain()
    behind.close()
    assert got == [(i, [float(i)] * 4) for i in range(10)]


@pytest.mark.parametrize("buffers", [2, 5])
def test_a_stalled_writer_holds_buffers_chunks_then_the_caller_waits(buffers: int) -> None:
    release = threading.Event()
    behind = WriteBehind(chunk_bytes=16, buffers=buffers)
    x = torch.ones(4)
    # the first is being written (stalled), the rest wait in their buffers
    for i in range(buffers):
        behind.write(lambda row, t: release.wait(), i, x)
    blocked = threading.Thread(target=behind.write, args=(lambda row, t: None, buffers, x))
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive()  # no buffer is free until a write finishes
    release.set()
    blocked.join(5)
    assert not blocked.is_alive()
    behind.drain()
    behind.close()


def test_the_first_error_stops_later_writes_and_is_raised() -> None:
    written: list[int] = []

    def write(row: int, t: torch.Tensor) -> None:
        if row == 1:
            raise OSError("disk full")
        written.append(row)

    behind = WriteBehind(chunk_bytes=16, buffers=3)
    with pytest.raises(OSError, match="disk full"):  # at the third write if the thread got there first, else at drain
        for i in range(3):
            behind.write(write, i, torch.ones(4))
        behind.drain()
    with pytest.raises(OSError, match="disk full"):
        behind.write(write, 3, torch.ones(4))
    behind.close()
    assert written == [0]
