"""Checksums of written tensors and shards: what the journal and the manifest record, and ``verify`` checks."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from streammerge.errors import OutputError

_PIECE = 16 << 20  # read back in pieces: memory stays bounded whatever the tensor's size


def sha256_range(fd: int, offset: int, nbytes: int, path: Path) -> str:
    """sha256 of ``nbytes`` of the file at ``offset``; an error if the file ends first."""
    h = hashlib.sha256()
    done = 0
    while done < nbytes:
        piece = os.pread(fd, min(_PIECE, nbytes - done), offset + done)
        if not piece:
            raise OutputError(f"{path}: ends at byte {offset + done}, inside a tensor that needs bytes up to {offset + nbytes} (truncated)")
        h.update(piece)
        done += len(piece)
    return h.hexdigest()


def shard_digest(header_sha256: str, tensor_sha256s: list[str]) -> str:
    """A shard's checksum: sha256 over its header's sha256 and its tensors' sha256s in file order.

    Tensors lie back to back after the header, so this covers every byte of the file, and it is
    composed from per-tensor checksums: no second read of the output to compute it.
    """
    h = hashlib.sha256(header_sha256.encode())
    for t in tensor_sha256s:
        h.update(t.encode())
    return h.hexdigest()
