"""Copies between the host and a CUDA device, overlapped with the merge.

Inputs: the reader thread puts each chunk's inputs into one of two reused page-locked (pinned)
buffers and copies them to the GPU on a stream of its own; the merge waits on that copy's event, so
while chunk k merges, chunk k+1 is read and copied. Results: each merged chunk is copied into one of
two pinned buffers on another stream, and a writer thread writes it to disk once that copy is done,
while the next chunk merges. Pinning is slow, so the buffers are made once (grown only if a chunk
does not fit) and a buffer is reused only after the copy that used it has finished.

A GPU buffer made on one stream and used on another is marked with ``record_stream``, so the
caching allocator does not hand it out again until the other stream is done with it. Events are
blocking: a thread waiting for a copy sleeps instead of spinning on a core the merge could use.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass

import torch

from streammerge.io.write_behind import Write, WriteBehind

_ALIGN = 256  # byte alignment of each input inside a chunk's buffer: every dtype's views stay aligned


class _Pinned:
    """A reusable pinned host buffer and the event of the last copy that used it."""

    def __init__(self, nbytes: int):
        self._min = nbytes
        self._buffer: torch.Tensor | None = None
        self.event: torch.cuda.Event | None = None

    def wait(self) -> None:
        """Until the copy that last used the buffer is done."""
        if self.event is not None:
            self.event.synchronize()
            self.event = None

    def take(self, nbytes: int) -> torch.Tensor:
        """``nbytes`` of the buffer, once the copy that last used it is done."""
        self.wait()
        if self._buffer is None or self._buffer.numel() < nbytes:
            self._buffer = None  # the old one is freed before a larger one is pinned
            self._buffer = torch.empty(max(nbytes, self._min), dtype=torch.uint8, pin_memory=True)
        return self._buffer[:nbytes]


def _as(buffer: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``buffer`` (uint8, ``like.nbytes`` long) viewed with ``like``'s dtype and shape."""
    return buffer.view(like.dtype).reshape(like.shape)


def chunk_layout(nbytes: list[int]) -> tuple[list[int], int]:
    """Where each of a chunk's inputs of these sizes starts in one buffer, and the buffer's size:
    each input aligned to 256 bytes, so every dtype's views stay aligned."""
    offsets, end = [], 0
    for n in nbytes:
        offsets.append(end)
        end += -(-n // _ALIGN) * _ALIGN
    return offsets, end


@dataclass
class InFlight:
    """A chunk's inputs on their way to the GPU: usable on the merge's stream after ``arrive``."""

    tensors: list[torch.Tensor]
    buffer: torch.Tensor  # the GPU buffer the tensors are views of
    copied: torch.cuda.Event

    def arrive(self) -> list[torch.Tensor]:
        """The inputs, for kernels on the current stream, which waits for the copy (the host does not)."""
        stream = torch.cuda.current_stream(self.buffer.device)
        stream.wait_event(self.copied)
        self.buffer.record_stream(stream)
        return self.tensors


class HostToDevice:
    """The reader thread's end: ``send`` a chunk's host tensors, get back an ``InFlight``."""

    def __init__(self, device: torch.device, chunk_bytes: int):
        self._device = device
        self._stream = torch.cuda.Stream(device)
        self._pinned = [_Pinned(chunk_bytes), _Pinned(chunk_bytes)]  # double-buffered: read one while the other copies
        self._turn = 0

    def send(self, tensors: list[torch.Tensor]) -> InFlight:
        offsets, total = chunk_layout([t.nbytes for t in tensors])
        pinned = self._pinned[self._turn]
        self._turn ^= 1
        host = pinned.take(total)
        for t, at in zip(tensors, offsets):
            _as(host[at : at + t.nbytes], t).copy_(t)
        with torch.cuda.stream(self._stream):
            buffer = torch.empty(total, dtype=torch.uint8, device=self._device)
            buffer.copy_(host, non_blocking=True)
            copied = torch.cuda.Event(blocking=True)
            copied.record(self._stream)
        pinned.event = copied
        return InFlight([_as(buffer[at : at + t.nbytes], t) for t, at in zip(tensors, offsets)], buffer, copied)


class DeviceToHost:
    """The merge's end on a GPU: ``write`` copies a merged chunk to a pinned buffer without waiting,
    and a ``WriteBehind`` thread writes it to disk when the copy is done."""

    def __init__(self, device: torch.device, chunk_bytes: int):
        self._device = device
        self._stream = torch.cuda.Stream(device)
        self._free: queue.Queue[_Pinned] = queue.Queue()
        for _ in range(2):  # double-buffered: one copies back while the other is written
            self._free.put(_Pinned(chunk_bytes))
        self._behind = WriteBehind()  # bounded by the two buffers
        self.then, self.drain, self.close = self._behind.then, self._behind.drain, self._behind.close

    def write(self, write: Write, row_start: int, tensor: torch.Tensor) -> None:
        if not tensor.is_cuda:  # copied tensors never went to the GPU
            self._behind.write(write, row_start, tensor)
            return
        pinned = self._free.get()
        host = _as(pinned.take(tensor.nbytes), tensor)
        self._stream.wait_stream(torch.cuda.current_stream(self._device))  # the merge that made it
        with torch.cuda.stream(self._stream):
            host.copy_(tensor, non_blocking=True)
            pinned.event = torch.cuda.Event(blocking=True)
            pinned.event.record(self._stream)
        tensor.record_stream(self._stream)

        def run() -> None:
            pinned.wait()
            write(row_start, host)

        self._behind.put(run, release=lambda: self._free.put(pinned))
