"""The safetensors file format, kept tiny: dtype codes, header parsing and header building.

A file is an 8-byte little-endian header length N, N bytes of JSON, then the tensor data. The JSON
maps tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` relative to the end of
the header, plus an optional ``__metadata__`` dict of strings.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass

import torch

from streammerge.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}
DTYPE_CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

# Refuse absurd headers before allocating for them (the format's own reader uses the same bound).
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in a safetensors file. ``offset`` is absolute in the file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def rows(self, rows: slice | None) -> tuple[tuple[int, ...], int, int]:
        """The shape, absolute offset and byte count of rows ``rows`` of the first dimension
        (all of the tensor when None): a row range is one contiguous byte range."""
        if rows is None or not self.shape:
            return self.shape, self.offset, self.nbytes
        row_bytes = self.nbytes // self.shape[0] if self.shape[0] else 0
        start, stop, _ = rows.indices(self.shape[0])
        offset = self.offset + start * row_bytes
        return (stop - start, *self.shape[1:]), offset, (stop - start) * row_bytes


def header_bytes(first: bytes, size: int, read_at: Callable[[int, int], bytes]) -> bytes:
    """The header (8-byte length and JSON) of a file of ``size`` bytes that starts with ``first``;
    what it needs beyond ``first`` comes from one ``read_at(offset, count)``. A length beyond the
    file or the bound is left to ``parse_header`` to refuse, without reading for it."""
    if len(first) >= 8:
        need = 8 + int.from_bytes(first[:8], "little")
        if len(first) < need <= size and need - 8 <= MAX_HEADER_BYTES:
            first += read_at(len(first), need - len(first))
        return first[:need]
    return first


def parse_header(raw: bytes, file_size: int, path: str) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse and validate a header given its first bytes; returns (entries, metadata).

    ``raw`` holds at least the 8-byte length and the JSON that follows it. Every entry is checked
    against ``file_size`` so that later reads never leave the file.
    """
    if len(raw) < 8:
        raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise CheckpointError(f"{path}: header length {n} exceeds the file size {file_size} (truncated or not safetensors)")
    try:
        header = json.loads(raw[8 : 8 + n], object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: header is not valid JSON ({e})") from None
    except _DuplicateKey as e:
        raise CheckpointError(f"{path}: header lists {e.args[0]!r} twice") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: __metadata__ is not a JSON object")

    data_start = 8 + n
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        entries[name] = _parse_entry(name, info, data_start, file_size, path)
    _check_no_overlap(entries, path)
    return entries, metadata


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object, refusing repeated keys (``json`` would keep the last one silently)."""
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _parse_entry(name: str, info: object, data_start: int, file_size: int, path: str) -> TensorEntry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise CheckpointError(f"{where}: entry is not a JSON object")
    code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(code, str) or code not in DTYPES:  # a list or object here is unhashable
        raise CheckpointError(
            f"{where}: unsupported dtype {code!r} (supported: {', '.join(DTYPES)}); convert the checkpoint to bf16/f16/f32"
        )
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end")
    dtype = DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    begin, end = offsets
    if end - begin != expected:
        raise CheckpointError(f"{where}: data_offsets span {end - begin} bytes but shape {shape} x {code} needs {expected}")
    if data_start + end > file_size:
        raise CheckpointError(f"{where}: data ends at byte {data_start + end}, past the end of the file ({file_size} bytes; truncated?)")
    return TensorEntry(name, dtype, tuple(shape), data_start + begin, expected)


def _check_no_overlap(entries: dict[str, TensorEntry], path: str) -> None:
    spans = sorted((e.offset, e.offset + e.nbytes, e.name) for e in entries.values() if e.nbytes)
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise CheckpointError(f"{path}: tensors {a!r} and {b!r} overlap in the file")


def build_header(tensors: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    """Header bytes for tensors stored back to back in the given order; returns (header, data offsets).

    The JSON is padded with spaces so the data starts 8-byte aligned, as safetensors itself does.
    The returned offsets are absolute positions in the file.
    """
    doc: dict[str, object] = {"__metadata__": dict(metadata)}
    cursor = 0
    relative: dict[str, int] = {}
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * dtype.itemsize
        doc[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [cursor, cursor + nbytes]}
        relative[name] = cursor
        cursor += nbytes
    body = json.dumps(doc, separators=(",", ":")).encode()
    body += b" " * (-(8 + len(body)) % 8)
    header = struct.pack("<Q", len(body)) + body
    return header, {name: len(header) + off for name, off in relative.items()}
