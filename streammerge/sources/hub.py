"""Safetensors shards on the Hugging Face Hub, at the commit a plan resolved.

``HubShard`` reads a shard's header with two HTTP range requests (its 8-byte length, then the
JSON), through huggingface_hub's own session, URL and headers, so endpoints, tokens and proxies
behave as in every other huggingface_hub call. Its tensors are read from a local copy, downloaded
at that commit into the Hugging Face cache on first need (or by ``download``), or, under a disk
budget, one that ``streammerge.sources.feed`` downloaded into its own folder and ``attach``ed; or,
once ``stream``ed (``--stream-inputs``), straight from the Hub: each read of a tensor's rows is one
ranged GET of their bytes, retried and resumed by ``streammerge.sources.fetch``, nothing stored.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from streammerge.errors import CheckpointError
from streammerge.io.hub import fetch_error, fetch_errors, snapshot_cache, snapshot_reference
from streammerge.io.reader import ShardReader
from streammerge.io.safetensors_format import header_bytes, parse_header
from streammerge.sources.fetch import fetch_range, fetch_span


@dataclass(frozen=True)
class HubSnapshot:
    """A repo at one commit, whose files huggingface_hub's cache puts in ``directory``."""

    repo: str
    commit: str
    directory: Path

    @classmethod
    def of(cls, directory: Path) -> HubSnapshot | None:
        """The snapshot a cache directory (``.../models--org--name/snapshots/<commit>``) stands for."""
        ref = snapshot_reference(directory)
        if ref is None:
            return None
        repo, _, commit = ref.partition("@")
        return cls(repo, commit, directory)

    @property
    def ref(self) -> str:
        return f"{self.repo}@{self.commit}"

    def read_range(self, file: str, start: int, count: int) -> tuple[bytes, int]:
        """Bytes ``start`` to ``start + count`` of ``file`` and the file's size, by a range request
        retried after a transient failure (``sources.fetch``)."""
        return fetch_span(self, file, start, count)

    def download(self, file: str) -> Path:
        """``file`` at this commit, in the cache (a no-op once there)."""
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(self.repo, file, revision=self.commit,
                                        cache_dir=snapshot_cache(self.directory)))
        except fetch_errors() as e:
            raise fetch_error(self.ref, e, file) from None


class HubShard:
    """A safetensors file of a Hub snapshot: the header now, the tensors once downloaded.

    It has ``ShardReader``'s interface, so a ``Checkpoint`` mixes local and Hub shards. ``path``
    is where a download into the cache lands (the snapshot directory's entry for the file)."""

    def __init__(self, snapshot: HubSnapshot, file: str):
        self.snapshot = snapshot
        self.path = snapshot.directory / file
        first, size = snapshot.read_range(file, 0, 8)
        header = header_bytes(first, size, lambda offset, count: snapshot.read_range(file, offset, count)[0])
        self.entries, self.metadata = parse_header(header, size, f"{snapshot.ref}: {file}")
        self.size = size
        self.header_sha256 = hashlib.sha256(header).hexdigest()
        self._local: ShardReader | None = None
        self._lock = threading.Lock()
        self._streaming = False
        self.stream_seconds = 0.0  # spent in range requests (``--stream-inputs``)

    @property
    def downloaded(self) -> bool:
        return self._local is not None

    @property
    def key(self) -> tuple[str, str, str]:
        """What the shard is, whichever checkpoint opened it: (repo, commit, file)."""
        return self.snapshot.repo, self.snapshot.commit, self.path.name

    def download(self) -> ShardReader:
        """The local copy, downloaded into the cache first when missing."""
        with self._lock:  # the engine's reader and prefetch threads may both ask
            if self._local is None:
                self._local = self._planned(self.snapshot.download(self.path.name))
            return self._local

    def attach(self, path: Path) -> None:
        """Read the tensors from ``path``, a copy downloaded elsewhere (``sources.feed``)."""
        reader = self._planned(path)
        with self._lock:
            self._local = reader

    def detach(self) -> None:
        """Stop reading the local copy (it is about to be deleted); a later read downloads again."""
        with self._lock:  # not while a prefetch thread queues reads of it
            if self._local is not None:
                self._local.close()
                self._local = None

    def _planned(self, path: Path) -> ShardReader:
        """A reader of ``path``, which must be the file that was planned."""
        reader = ShardReader(path)
        if (reader.size, reader.header_sha256) != (self.size, self.header_sha256):
            reader.close()
            raise CheckpointError(f"{self.snapshot.ref}: {self.path.name}: the downloaded file is "
                                  "not the one planned from its header (size or header differ)")
        return reader

    def stream(self) -> None:
        """From now on read tensors by HTTP range requests, storing nothing (``--stream-inputs``)."""
        self._streaming = True

    def read(self, name: str, rows: slice | None = None, into: torch.Tensor | None = None) -> torch.Tensor:
        if not self._streaming:
            return self.download().read(name, rows, into)
        e = self.entries[name]
        shape, offset, nbytes = e.rows(rows)
        buf = torch.empty(nbytes, dtype=torch.uint8) if into is None else into[:nbytes]
        began = time.perf_counter()
        fetch_range(self.snapshot, self.path.name, offset, memoryview(buf.numpy()), self.size)
        with self._lock:  # the engine reads several chunks at once
            self.stream_seconds += time.perf_counter() - began
        return buf.view(e.dtype).reshape(shape)

    def sha256(self, name: str) -> str:
        return self.download().sha256(name)

    def prefetch(self, name: str, stop: threading.Event | None = None, direct: bool = False) -> None:
        with self._lock:  # a hint: it never starts a download, nor races ``detach``
            if self._local is not None:
                self._local.prefetch(name, stop, direct)

    def release(self, name: str) -> None:
        with self._lock:
            if self._local is not None:
                self._local.release(name)

    def close(self) -> None:
        self.detach()
