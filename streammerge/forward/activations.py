"""Hidden states between layers: in memory up to a budget, the rest in an unlinked temp file.

The file is written and read with ``pwrite``/``pread`` into buffers this process owns rather than
memory-mapped: pages touched through a mapping stay resident and count in RSS, so a mapped spill
would grow with the number of samples just as keeping them in memory does.
"""

from __future__ import annotations

import os
import tempfile

import torch


class ActivationStore:
    """One tensor per key (a batch's hidden states), replaced as the batch moves through layers.

    A key keeps its place for the whole run: a tensor that fits the budget when first stored stays
    in memory, one that does not gets a slot of the file, overwritten by each later ``put``.
    """

    def __init__(self, budget: int, directory: str | None = None):
        self.budget, self._directory = budget, directory
        self._held: dict[int, torch.Tensor] = {}
        # key -> offset, capacity, dtype, shape in the file
        self._slots: dict[int, tuple[int, int, torch.dtype, torch.Size]] = {}
        self._fd: int | None = None
        self._end = 0
        self.held_bytes = 0
        self.spilled_bytes = 0  # file bytes in use: 0 means nothing spilled

    def put(self, key: int, tensor: torch.Tensor) -> None:
        tensor = tensor.contiguous()
        if key in self._held or (key not in self._slots and self.held_bytes + tensor.nbytes <= self.budget):
            self.held_bytes += tensor.nbytes - (self._held[key].nbytes if key in self._held else 0)
            self._held[key] = tensor
            return
        offset, capacity = self._slot(key, tensor.nbytes)
        data = tensor.view(torch.uint8).reshape(-1).numpy() if tensor.nbytes else b""
        done = 0
        while done < tensor.nbytes:
            done += os.pwrite(self._fd, memoryview(data)[done:], offset + done)
        self._slots[key] = (offset, capacity, tensor.dtype, tensor.shape)

    def _slot(self, key: int, nbytes: int) -> tuple[int, int]:
        if self._fd is None:
            self._fd = _unlinked_file(self._directory)
        if key in self._slots and self._slots[key][1] >= nbytes:
            return self._slots[key][:2]
        offset, self._end = self._end, self._end + nbytes
        self.spilled_bytes += nbytes
        return offset, nbytes

    def get(self, key: int) -> torch.Tensor:
        if key in self._held:
            return self._held[key]
        offset, _, dtype, shape = self._slots[key]
        buf = torch.empty(torch.Size(shape).numel() * dtype.itemsize, dtype=torch.uint8)
        view, done = memoryview(buf.numpy()), 0
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n == 0:
                raise OSError(f"activation spill file ended at byte {offset + done}")
            done += n
        if hasattr(os, "POSIX_FADV_DONTNEED"):  # read back: the page cache may drop it
            os.posix_fadvise(self._fd, offset, len(view), os.POSIX_FADV_DONTNEED)
        return buf.view(dtype).reshape(shape)

    def close(self) -> None:
        self._held.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unlinked_file(directory: str | None) -> int:
    """A temp file that is gone from the directory already, so nothing is left behind on a crash."""
    fd, path = tempfile.mkstemp(prefix="streammerge-activations-", dir=directory)
    os.unlink(path)
    return fd
