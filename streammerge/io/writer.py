"""Streaming output: shard headers written first, tensor bytes pwritten at their offsets.

``StagedOutput`` builds the model in a staging directory beside the destination and renames it
into place only when every shard, the index, the config and the card are written and fsynced, so
the destination path never holds a half-written model. A staging directory left by a failed or
killed run is kept, for the journal in it to resume from (see ``streammerge.journal``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from streammerge.errors import OutputError
from streammerge.io.digest import sha256_range


def _pwrite_all(fd: int, data: memoryview, offset: int, path: Path) -> None:
    done = 0
    try:
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OutputError(f"{path}: disk full while writing ({e.strerror}); free space and run again") from None
        raise


_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing a range back now, without waiting (Linux sync_file_range)."""
    if hasattr(_LIBC, "sync_file_range"):
        _LIBC.sync_file_range(fd, ctypes.c_int64(offset), ctypes.c_int64(nbytes), _SYNC_FILE_RANGE_WRITE)


class ShardWriter:
    """One output shard: its exact header, then tensors (or row chunks of them) at known offsets.

    An existing file (a resumed run's) is opened as it is: the tensors already in it are kept.
    """

    def __init__(self, path: Path, header: bytes, size: int):
        self.path = path
        self._fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            os.posix_fallocate(self._fd, 0, size)  # reserve the space now: a full disk fails here, not midway
        except OSError as e:
            if e.errno == errno.ENOSPC:
                os.close(self._fd)
                raise OutputError(f"{path}: not enough disk space for {size} bytes; free space and run again") from None
            os.ftruncate(self._fd, size)  # filesystems without fallocate
        _pwrite_all(self._fd, memoryview(header), 0, path)
        self._hashing: dict[int, tuple[int, "hashlib._Hash"]] = {}  # end offset → (start, running hash)

    def write(self, offset: int, tensor: torch.Tensor) -> None:
        """Write at ``offset`` and start its writeback now, so the sync that makes it durable has
        little left to wait for. Consecutive writes (a tensor's row chunks) are hashed as they go."""
        data = memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
        _pwrite_all(self._fd, data, offset, self.path)
        _start_writeback(self._fd, offset, len(data))
        start, h = self._hashing.pop(offset, (offset, None))
        h = h or hashlib.sha256()
        h.update(data)
        self._hashing[offset + len(data)] = (start, h)

    def sync(self) -> None:
        """Make every byte written so far durable, then let the page cache drop it: a cgroup-limited
        session counts cached pages against its memory."""
        os.fdatasync(self._fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def sha256(self, offset: int, nbytes: int) -> str:
        """The sha256 of bytes [offset, offset + nbytes): from the writes when they were consecutive,
        else read back."""
        start, h = self._hashing.get(offset + nbytes, (None, None))
        if start == offset and h is not None:
            del self._hashing[offset + nbytes]
            return h.hexdigest()
        return sha256_range(self._fd, offset, nbytes, self.path)

    def close(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lock_staging(staging: Path) -> int:
    """An exclusive lock on a staging directory (its descriptor; closing it releases the lock),
    held while one run writes in it."""
    fd = os.open(staging, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputError(f"{staging}: another streammerge process is writing this output; wait for "
                          "it to finish") from None
    return fd


class StagingDirectory:
    """A model being written: shards, then the small files, into ``staging``."""

    def __init__(self, staging: Path):
        self.staging = staging

    def path(self, filename: str) -> Path:
        return self.staging / filename


class StagedOutput(StagingDirectory):
    """A staging directory that becomes ``destination`` atomically on ``commit``."""

    def __init__(self, destination: Path, overwrite: bool, restart: bool = False):
        self.destination = destination
        if destination.exists() and not overwrite:
            raise OutputError(f"{destination}: output already exists; pass --overwrite to replace it")
        if destination.exists() and not destination.is_dir():
            raise OutputError(f"{destination}: exists and is not a directory")
        super().__init__(destination.parent / f".{destination.name}.streammerge-partial")
        try:
            destination.parent.mkdir(parents=True, exist_ok=True)
            if restart and self.staging.exists():
                shutil.rmtree(self.staging)
            self.staging.mkdir(exist_ok=True)
        except OSError as e:
            raise OutputError(f"{self.staging}: cannot create the staging directory ({e.strerror})") from None

    def write_text(self, filename: str, text: str) -> None:
        with open(self.staging / filename, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def write_json(self, filename: str, obj: object) -> None:
        self.write_text(filename, json.dumps(obj, indent=2, sort_keys=False) + "\n")

    def copy_in(self, source: Path) -> None:
        shutil.copyfile(source, self.staging / source.name)
        with open(self.staging / source.name, "rb") as f:
            os.fsync(f.fileno())

    def remove(self, filename: str) -> None:
        os.unlink(self.staging / filename)

    def commit(self) -> None:
        fsync_dir(self.staging)
        old = None
        if self.destination.exists():
            old = self.destination.parent / f".{self.destination.name}.streammerge-old"
            if old.exists():
                shutil.rmtree(old)
            os.rename(self.destination, old)
        os.rename(self.staging, self.destination)
        fsync_dir(self.destination.parent)
        if old is not None:
            shutil.rmtree(old)
