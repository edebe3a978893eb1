"""Lazy readers for Hugging Face checkpoints: one tensor, or a row range of it, at a time.

``ShardReader`` parses a safetensors header itself. A read into the caller's buffer goes past the
page cache (``O_DIRECT``); any other read is mapped on its own, copy-on-write: the tensor it
returns is the page cache's pages, not a copy of them, and its mapping lives as long as it does.
``prefetch`` has the disk fill the page cache ahead of mapped reads and ``release`` lets the
kernel drop those pages again (cgroup-limited sessions count the cache against their memory).
``Checkpoint`` resolves a model directory: ``model.safetensors``, sharded safetensors with
``model.safetensors.index.json``, or PyTorch ``.bin`` files (loaded with ``weights_only=True``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import mmap
import os
import pickle
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from streammerge.errors import CheckpointError
from streammerge.io.digest import sha256_range
from streammerge.io.hub import on_hub
from streammerge.io.safetensors_format import TensorEntry, header_bytes, parse_header

if TYPE_CHECKING:
    from streammerge.sources.hub import HubShard

_HEADER_PROBE = 1 << 16
# Linux queues at most the device's readahead window per WILLNEED (128 KiB by default, 8 MiB on the
# benchmark's disk) and ignores the rest of the range: a whole tensor is advised a piece at a time.
_PREFETCH_PIECE = 2 << 20
# Tensors that only quantized checkpoints carry (GPTQ/AWQ packed weights, bitsandbytes state).
_QUANTIZED_SUFFIXES = (".qweight", ".qzeros", ".g_idx", ".absmax", ".quant_map", ".quant_state.bitsandbytes__nf4",
                       ".quant_state.bitsandbytes__fp4", ".SCB", ".weight_format")


# O_DIRECT needs the file offset, the length and the buffer's address in whole logical blocks
# (512 B or 4 KiB): reads are widened to pages and land in page-aligned buffers.
_DIRECT_ALIGN = 4096


def direct_room(nbytes: int) -> int:
    """Bytes of buffer a read of ``nbytes`` at any offset needs: the range widened to whole pages."""
    return -(-nbytes // _DIRECT_ALIGN) * _DIRECT_ALIGN + _DIRECT_ALIGN


def aligned_buffer(nbytes: int) -> torch.Tensor:
    """``nbytes`` uninitialized bytes starting on a page boundary, for ``ShardReader.read``'s ``into``."""
    raw = torch.empty(nbytes + _DIRECT_ALIGN, dtype=torch.uint8)
    start = -raw.data_ptr() % _DIRECT_ALIGN
    return raw[start:start + nbytes]


# madvise(MADV_POPULATE_READ), Linux 5.14 (Python's mmap module has no name for it): the reader
# thread maps a read's pages in one call, not the merge a fault at a time as it touches them.
_MADV_POPULATE_READ = 22


def _mapped(fd: int, offset: int, nbytes: int, path: Path) -> torch.Tensor:
    """Bytes [offset, offset + nbytes) of the file, mapped copy-on-write, so a method that writes
    into its inputs writes into private pages; unmapped when the tensor is freed.

    pread copied every input byte out of the page cache once per pass; mapping instead took a
    4-layer 7B-shaped TIES merge from 6.7-8.1 to 5.0-5.2 s of system time (linear: 5.5 to 4.2)."""
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    try:
        m = mmap.mmap(fd, offset + nbytes - start, access=mmap.ACCESS_COPY, offset=start)
    except ValueError:  # the range runs past the end: the file shrank since its header was read
        end = os.fstat(fd).st_size
        raise CheckpointError(f"{path}: unexpected end of file at byte {end} (truncated?)") from None
    try:
        m.madvise(_MADV_POPULATE_READ)
    except OSError:  # an older kernel: pages are faulted in as the merge reads them
        pass
    return torch.frombuffer(m, dtype=torch.uint8, count=nbytes, offset=offset - start)


class ShardReader:
    """One safetensors file: its parsed header and positioned reads of its tensors."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot open ({e.strerror})") from None
        size = os.fstat(self._fd).st_size
        header = header_bytes(os.pread(self._fd, min(size, _HEADER_PROBE), 0), size,
                              lambda offset, count: os.pread(self._fd, count, offset))
        self.entries, self.metadata = parse_header(header, size, str(path))
        self.size = size
        self.header_sha256 = hashlib.sha256(header).hexdigest()
        self._direct_fd: int | None = None  # opened with O_DIRECT; None where the filesystem refuses it
        if hasattr(os, "O_DIRECT"):
            with contextlib.suppress(OSError):  # tmpfs before Linux 6.6, some FUSE filesystems
                self._direct_fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        self._direct = self._direct_fd is not None  # false too once a direct read was refused

    def read(self, name: str, rows: slice | None = None, into: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor ``name`` (or rows ``rows`` of its first dimension). With ``into`` (page-aligned,
        ``direct_room`` bytes) it is read into ``into`` past the page cache where the filesystem
        allows it; otherwise, and without ``into``, it is mapped from the page cache.

        Every byte a buffered read brings in is later dropped from the cache again: at 32 layers
        the readahead, the mapping and the drop cost a linear merge 0.65 CPU-s per GB of input
        (system time); a direct read costs 0.05."""
        e = self.entries[name]
        shape, offset, nbytes = e.rows(rows)
        buf = None
        if into is not None and nbytes and self._direct:
            buf = self._read_direct(offset, nbytes, into)
        if buf is None and nbytes:
            buf = _mapped(self._fd, offset, nbytes, self.path)
        if buf is None:
            buf = torch.empty(0, dtype=torch.uint8)
        return buf.view(e.dtype).reshape(shape)

    def _read_direct(self, offset: int, nbytes: int, into: torch.Tensor) -> torch.Tensor | None:
        """Bytes [offset, offset + nbytes) read into ``into`` with O_DIRECT, or None (and no direct
        reads from now on) if the filesystem refuses the read."""
        start = offset - offset % _DIRECT_ALIGN
        end = -(-(offset + nbytes) // _DIRECT_ALIGN) * _DIRECT_ALIGN
        view = memoryview(into[:end - start].numpy())
        done = 0
        try:
            while done < end - start and (n := os.preadv(self._direct_fd, [view[done:]], start + done)):
                done += n
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self._direct = False  # the descriptor stays open: another thread may be reading with it
            return None
        if done < offset + nbytes - start:  # the file ends before the tensor does
            raise CheckpointError(f"{self.path}: unexpected end of file at byte {start + done} (truncated?)")
        return into[offset - start:offset - start + nbytes]

    def sha256(self, name: str) -> str:
        e = self.entries[name]
        return sha256_range(self._fd, e.offset, e.nbytes, self.path)

    def prefetch(self, name: str, stop: threading.Event | None = None, direct: bool = False) -> None:
        """Queue reads of this tensor into the page cache, piece by piece until ``stop`` is set. The
        disk reads in the background, but queueing blocks while the device's queue is full.
        ``direct``: the caller will read it into buffers, which go past the cache where they can."""
        e = self.entries[name]
        if direct and self._direct:
            return
        if hasattr(os, "POSIX_FADV_WILLNEED"):
            for at in range(e.offset, e.offset + e.nbytes, _PREFETCH_PIECE):
                if stop is not None and stop.is_set():
                    return
                os.posix_fadvise(self._fd, at, min(_PREFETCH_PIECE, e.offset + e.nbytes - at), os.POSIX_FADV_WILLNEED)

    def release(self, name: str) -> None:
        """Let the kernel drop this tensor's pages from the page cache."""
        e = self.entries[name]
        if e.nbytes and hasattr(os, "POSIX_FADV_DONTNEED"):
            os.posix_fadvise(self._fd, e.offset, e.nbytes, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        os.close(self._fd)
        if self._direct_fd is not None:
            os.close(self._direct_fd)


class BinReader:
    """A PyTorch pickle checkpoint, opened with ``weights_only=True`` and ``mmap=True`` per read.

    Re-opening per read keeps no mapping alive between tensors, so touched pages never pile up.
    """

    def __init__(self, path: Path):
        self.path = path
        self.size = path.stat().st_size
        with open(path, "rb") as f:  # a .bin is a zip whose directory at the end holds every record's CRC
            head = f.read(_HEADER_PROBE)
            f.seek(max(0, self.size - _HEADER_PROBE))
            self.header_sha256 = hashlib.sha256(head + f.read()).hexdigest()
        state = self._load()
        self.entries = {
            name: TensorEntry(name, t.dtype, tuple(t.shape), 0, t.numel() * t.element_size()) for name, t in state.items()
        }

    def _load(self) -> dict[str, torch.Tensor]:
        try:
            state = torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{self.path}: cannot load as a weights-only PyTorch checkpoint ({first})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{self.path}: not a state dict of tensors")
        return state

    def read(self, name: str, rows: slice | None = None, into: torch.Tensor | None = None) -> torch.Tensor:
        t = self._load()[name]  # ``into`` unused: the mapping's pages are copied once either way
        return (t[rows] if rows is not None and t.dim() else t).clone()

    def prefetch(self, name: str, stop: threading.Event | None = None, direct: bool = False) -> None:
        pass  # records of a zip are not worth locating for a hint

    def release(self, name: str) -> None:  # the mapping is already gone after read()
        pass

    def close(self) -> None:
        pass


def quantization(config: dict, tensors: Iterable[str]) -> str | None:
    """Why a checkpoint (its config.json and tensor names) is quantized, or None when it is not."""
    quant = config.get("quantization_config")
    if quant is not None:
        kind = quant.get("quant_method", "unknown") if isinstance(quant, dict) else "unknown"
        return f"quantized checkpoint ({kind}, see config.json quantization_config)"
    name = next((n for n in tensors if n.endswith(_QUANTIZED_SUFFIXES)), None)
    if name is not None:
        return f"tensor {name!r} is quantization state (bitsandbytes/GPTQ/AWQ)"
    return None


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]


class Checkpoint:
    """A local Hugging Face model directory, read lazily tensor by tensor."""

    def __init__(self, path: str | Path, *, allow_quantized: bool = False):
        """``allow_quantized``: open a quantized checkpoint too (to describe it; it cannot be merged)."""
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: model directory not found")
        self._shards: dict[str, ShardReader | BinReader | HubShard] = {}
        self._where: dict[str, ShardReader | BinReader | HubShard] = {}
        try:
            self._index_shards()
            if not allow_quantized:
                self._refuse_quantized()
        except BaseException:
            self.close()
            raise

    def _index_shards(self) -> None:
        for shard in self._shard_files():
            reader = self._open(shard)
            for name in reader.entries:
                if name in self._where:
                    raise CheckpointError(
                        f"{self.path}: tensor {name!r} is stored twice ({self._where[name].path.name} and {shard.name})"
                    )
                self._where[name] = reader
        self.tensors = {name: TensorInfo(r.entries[name].dtype, r.entries[name].shape) for name, r in self._where.items()}

    def _refuse_quantized(self) -> None:
        found = quantization(self.config(), self.tensors)
        if found is not None:
            raise CheckpointError(f"{self.path}: {found}; merge the full-precision weights instead")

    def _open(self, shard: Path) -> ShardReader | BinReader | HubShard:
        if shard.name not in self._shards:
            from streammerge.sources import open_shard  # imported here: it builds on this module's readers

            self._shards[shard.name] = open_shard(shard)
        return self._shards[shard.name]

    def _shard_files(self) -> list[Path]:
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = self.path / index_name
            if index.is_file():
                return self._indexed_shards(index)
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (self.path / single).is_file():
                return [self.path / single]
        found = sorted(self.path.glob("*.safetensors"))
        if len(found) == 1:
            return found
        if on_hub(self.path / "model.safetensors"):  # a Hub snapshot without an index: one file
            return [self.path / "model.safetensors"]
        raise CheckpointError(
            f"{self.path}: no weights found (expected model.safetensors, model.safetensors.index.json with shards, or pytorch_model.bin)"
        )

    def _indexed_shards(self, index: Path) -> list[Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid index (needs a 'weight_map' object): {e}") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: 'weight_map' is not an object")
        shards = []
        for file in sorted(set(weight_map.values())):
            # Checked by name, not by resolving links: a Hub snapshot's shards link into its blob store.
            if not isinstance(file, str) or Path(file).name != file or file in ("", ".", ".."):
                raise CheckpointError(f"{index}: shard path {file!r} points outside the model directory")
            shard = self.path / file
            if not shard.is_file() and not on_hub(shard):
                raise CheckpointError(f"{index}: names shard {file!r}, which does not exist")
            shards.append(shard)
        for name, file in weight_map.items():
            reader = self._open(self.path / str(file))
            if name not in reader.entries:
                raise CheckpointError(f"{index}: maps tensor {name!r} to {file}, which does not contain it")
        return shards

    def fingerprint(self) -> dict[str, tuple[int, str]]:
        """Each weights file's size and header sha256: whether the inputs changed, without reading tensor data."""
        return {r.path.name: (r.size, r.header_sha256) for r in self._shards.values()}

    def file_of(self, name: str) -> Path:
        return self._where[name].path

    def shard_of(self, name: str) -> ShardReader | BinReader | HubShard:
        """The weights file holding tensor ``name``."""
        return self._where[name]

    def offset_of(self, name: str) -> int:
        return self._where[name].entries[name].offset

    def read(self, name: str, rows: slice | None = None, into: torch.Tensor | None = None) -> torch.Tensor:
        return self._where[name].read(name, rows, into)

    def prefetch(self, name: str, stop: threading.Event | None = None, direct: bool = False) -> None:
        self._where[name].prefetch(name, stop, direct)

    def release(self, name: str) -> None:
        self._where[name].release(name)

    def config(self) -> dict:
        path = self.path / "config.json"
        if not path.is_file():
            return {}
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{path}: not a JSON object")
        return config

    def close(self) -> None:
        for reader in self._shards.values():
            reader.close()
