"""The safetensors reader: header parsing, dtypes, row ranges, refusals, and no lasting mappings."""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import threading
import time
import os
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from streammerge.errors import CheckpointError
from streammerge.io.reader import Checkpoint, ShardReader, aligned_buffer, direct_room
from streammerge.io.safetensors_format import build_header, parse_header

ALL_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int8, torch.uint8, torch.int16,
              torch.int32, torch.int64, torch.bool]


def test_every_dtype_and_row_range_reads_back_exactly(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i, dt in enumerate(ALL_DTYPES):
        x = torch.randn(7, 5, generator=g) * 50
        tensors[f"t{i}"] = x > 0 if dt == torch.bool else x.to(dt)
    tensors["scalar"] = torch.tensor(3.5)
    tensors["empty"] = torch.zeros(0, 4)
    save_file(tensors, str(tmp_path / "a.safetensors"))
    r = ShardReader(tmp_path / "a.safetensors")
    for name, want in tensors.items():
        got = r.read(name)
        assert got.dtype == want.dtype and torch.equal(got, want), name
        if want.dim() and want.shape[0] > 3:
            assert torch.equal(r.read(name, slice(2, 5)), want[2:5]), name
        r.release(name)
    r.close()


def test_header_roundtrip_with_safetensors(tmp_path: Path) -> None:
    """A header built here is read by safetensors itself."""
    from safetensors import safe_open

    spec = [("a", torch.bfloat16, (3, 4)), ("b", torch.float32, (5,))]
    header, offsets = build_header(spec, {"format": "pt"})
    assert len(header) % 8 == 0
    a, b = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4), torch.arange(5, dtype=torch.float32)
    data = bytearray(header) + a.view(torch.uint8).numpy().tobytes() + b.view(torch.uint8).numpy().tobytes()
    assert offsets == {"a": len(header), "b": len(header) + 24}
    (tmp_path / "x.safetensors").write_bytes(bytes(data))
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("a"), a) and torch.equal(f.get_tensor("b"), b)


def _file(tmp_path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _raw(tmp_path: Path, data: bytes) -> Path:
    (tmp_path / "bad.safetensors").write_bytes(data)
    return tmp_path / "bad.safetensors"


BAD = {
    "header longer than file": (lambda t: _file(t, {}, length=10**6), "exceeds the file size"),
    "not json": (lambda t: _file(t, b"{nope"), "not valid JSON"),
    "not an object": (lambda t: _file(t, b"[1, 2]"), "not a JSON object"),
    "unknown dtype": (lambda t: _file(t, {"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, b"\0\0"), "unsupported dtype 'F8_E4M3'"),
    "out of bounds": (lambda t: _file(t, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8), "past the end"),
    "size mismatch": (lambda t: _file(t, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, b"\0" * 16), "needs 16"),
    "overlap": (lambda t: _file(t, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12), "overlap"),
    "truncated": (lambda t: _raw(t, b"\x05\0"), "not a safetensors file"),
    "a name twice in the header": (lambda t: _file(t, b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                                                      b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', b"\0" * 8),
                                   "header lists 'a' twice"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_files_are_refused_with_the_file_named(case: str, tmp_path: Path) -> None:
    make, words = BAD[case]
    path = make(tmp_path)
    with pytest.raises(CheckpointError) as e:
        ShardReader(path)
    assert str(path) in str(e.value) and words in str(e.value)


# CI runs a bounded number of examples; benchmarks/fuzz_headers.py runs many more.
FUZZ = settings(max_examples=int(os.environ.get("STREAMMERGE_FUZZ_EXAMPLES", "200")), deadline=None)


@FUZZ
@given(st.binary(max_size=200), st.integers(min_value=0, max_value=400))
def test_fuzz_header_parser_only_raises_its_own_error(raw: bytes, size: int) -> None:
    try:
        entries, _ = parse_header(raw, size, "fuzz")
    except CheckpointError:
        return
    for e in entries.values():
        assert e.offset + e.nbytes <= size


_ITEMSIZE = {"F32": 4, "BF16": 2, "I64": 8, "BOOL": 1}


@st.composite
def _headers(draw: st.DrawFn) -> tuple[dict, int]:
    """A header of tensors stored back to back, some of them then broken; and the data's length."""
    header: dict = {}
    cursor = 0
    for name in draw(st.lists(st.text(max_size=4), max_size=4, unique=True)):
        dtype = draw(st.sampled_from(list(_ITEMSIZE)))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        nbytes = math.prod(shape) * _ITEMSIZE[dtype]
        entry = {"dtype": dtype, "shape": shape, "data_offsets": [cursor, cursor + nbytes]}
        cursor += nbytes
        broken = draw(st.sampled_from([None, None, "dtype", "shape", "data_offsets"]))
        if broken is not None:
            entry[broken] = draw(st.one_of(st.integers(-4, 40), st.text(max_size=3), st.lists(st.integers(-4, 40), max_size=3)))
        header[name] = entry
    return header, cursor + draw(st.integers(-8, 8))


@FUZZ
@given(_headers(), st.integers(-3, 3), st.binary(max_size=4), st.integers(0, 200))
def test_fuzz_files_open_and_read_within_themselves_or_raise_our_error(
        header_and_size: tuple[dict, int], length_skew: int, noise: bytes, noise_at: int) -> None:
    """Headers shaped like real ones (consistent and broken entries, data too short or too long, a
    wrong header length, overwritten bytes): a file either opens and every tensor in it reads back
    in full, or fails with CheckpointError."""
    header, data_len = header_and_size
    body = bytearray(json.dumps(header).encode())
    body[noise_at : noise_at + len(noise)] = noise
    raw = struct.pack("<Q", max(0, len(body) + length_skew)) + bytes(body) + bytes(max(0, data_len))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.safetensors"
        path.write_bytes(raw)
        try:
            reader = ShardReader(path)
        except CheckpointError:
            event("refused")
            return
        event("opened with tensors" if reader.entries else "opened empty")
        try:
            for name, e in reader.entries.items():
                assert e.offset + e.nbytes <= len(raw)
                assert reader.read(name).numel() == e.numel
        finally:
            reader.close()


def test_index_problems_are_named(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(2)}, str(tmp_path / "s1.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    with pytest.raises(CheckpointError, match="names shard 's2.safetensors', which does not exist"):
        Checkpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../s1.safetensors"}}))
    with pytest.raises(CheckpointError, match="outside the model directory"):
        Checkpoint(tmp_path)
    save_file({"a": torch.zeros(2)}, str(tmp_path / "s2.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "x": "s2.safetensors"}}))
    with pytest.raises(CheckpointError, match="maps tensor 'x' to s2.safetensors, which does not contain it"):
        Checkpoint(tmp_path)


def test_shards_linked_into_a_blob_store_are_read(tmp_path: Path) -> None:
    """A Hugging Face Hub snapshot links each shard to ../../blobs/<hash>: names are checked, not link targets."""
    blobs, model = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    model.mkdir(parents=True)
    save_file({"a": torch.arange(3.0)}, str(blobs / "1111"))
    save_file({"b": torch.ones(2)}, str(blobs / "2222"))
    (model / "s1.safetensors").symlink_to("../../blobs/1111")
    (model / "s2.safetensors").symlink_to("../../blobs/2222")
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    ckpt = Checkpoint(model)
    assert torch.equal(ckpt.read("a"), torch.arange(3.0)) and torch.equal(ckpt.read("b"), torch.ones(2))
    ckpt.close()


def test_duplicate_tensor_across_shards(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(2), "b": torch.zeros(1)}, str(tmp_path / "s1.safetensors"))
    save_file({"a": torch.ones(2)}, str(tmp_path / "s2.safetensors"))
    idx = {"weight_map": {"a": "s2.safetensors", "b": "s1.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match="stored twice"):
        Checkpoint(tmp_path)


def test_bin_with_code_in_its_pickle_is_refused(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"w": torch.zeros(2), "x": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot load as a weights-only"):
        Checkpoint(tmp_path)


def _mapped(path: Path) -> bool:
    return str(path) in Path("/proc/self/maps").read_text()


def test_reads_leave_no_mapping_and_no_file_pages_resident(tmp_path: Path) -> None:
    """After reading every tensor of a 64 MiB file, nothing of it is mapped and RssFile has not grown."""
    tensors = {f"w{i}": torch.full((1024, 1024), float(i)) for i in range(16)}
    save_file(tensors, str(tmp_path / "big.safetensors"))

    def rss_file() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no RssFile")

    before = rss_file()
    r = ShardReader(tmp_path / "big.safetensors")
    for name in tensors:
        assert r.read(name)[0, 0].item() == float(name[1:])
        r.release(name)
    assert not _mapped(tmp_path / "big.safetensors")
    assert rss_file() - before < 8 << 20
    r.close()


def _cached_fraction(path: Path, offset: int, nbytes: int) -> float:
    """Of the pages holding bytes [offset, offset + nbytes) of ``path``, the fraction in the page cache (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                              ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        pages = ctypes.create_string_buffer((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE)
        assert libc.mincore(addr, size, pages) == 0, os.strerror(ctypes.get_errno())
        libc.munmap(addr, size)
    finally:
        os.close(fd)
    first, last = offset // mmap.PAGESIZE, (offset + nbytes - 1) // mmap.PAGESIZE
    return sum(b & 1 for b in pages.raw[first:last + 1]) / (last - first + 1)


def test_prefetch_reads_the_whole_tensor_into_the_page_cache(tmp_path: Path) -> None:
    """A 24 MiB tensor: Linux queues at most the device's readahead window per WILLNEED (128 KiB by
    default), so one advice over the whole range left most of it on disk. ``stop`` ends a prefetch."""
    path = tmp_path / "big.safetensors"
    save_file({"w": torch.ones(6 << 20), "v": torch.ones(6 << 20)}, str(path))
    with open(path, "rb") as f:
        os.fsync(f.fileno())  # dirty pages cannot be dropped
    r = ShardReader(path)
    w, v = r.entries["w"], r.entries["v"]
    r.release("w")
    r.release("v")
    if _cached_fraction(path, w.offset, w.nbytes) > 0.01:
        pytest.skip("this filesystem keeps its pages in memory (tmpfs?)")
    stop = threading.Event()
    stop.set()
    r.prefetch("v", stop)
    r.prefetch("w")
    deadline = time.monotonic() + 20
    while _cached_fraction(path, w.offset, w.nbytes) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    # readahead is best effort (under load the kernel may drop some); one advice cached a third here
    assert _cached_fraction(path, w.offset, w.nbytes) > 0.9
    assert _cached_fraction(path, v.offset + (1 << 20), v.nbytes - (1 << 20)) < 0.5  # no more than readahead of w's end
    r.close()


def test_a_failed_open_leaves_no_file_descriptor(fp32_family, tmp_path: Path) -> None:
    """A plan whose third model is broken closes the files of the two it already opened."""
    import os

    import streammerge

    bad = tmp_path / "bad"
    bad.mkdir()
    save_file({"a": torch.zeros(2)}, str(bad / "s1.safetensors"))
    save_file({"a": torch.ones(2)}, str(bad / "s2.safetensors"))
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    plan = {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 1.0}}
                                                 for m in (*fp32_family.models[:2], bad)]}
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(CheckpointError):
        streammerge.merge(plan, tmp_path / "out", quiet=True)
    assert len(os.listdir("/proc/self/fd")) == before


def _evicted(path: Path) -> None:
    """None of ``path``'s pages left in the page cache (where the filesystem lets them go)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())  # dirty pages cannot be dropped
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def _written(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, str(path))
    _evicted(path)


def _odd_tensors() -> dict[str, torch.Tensor]:
    """Tensors whose offsets and sizes fall anywhere within a page; the last one ends the file."""
    g = torch.Generator().manual_seed(1)
    dtypes = (torch.float32, torch.bfloat16)
    return {f"t{i}": torch.randn(rows, 1000 + 7 * i, generator=g).to(dtypes[i % 2])
            for i, rows in enumerate((3, 97, 1, 640, 13))}


def test_a_read_into_a_buffer_goes_past_the_page_cache_and_reads_the_same_bytes(tmp_path: Path) -> None:
    path = tmp_path / "odd.safetensors"
    tensors = _odd_tensors()
    _written(path, tensors)
    r = ShardReader(path)  # reading the header caches the file's first pages (and readahead)
    size = path.stat().st_size
    before, t3 = _cached_fraction(path, 0, size), r.entries["t3"]
    if _cached_fraction(path, t3.offset, t3.nbytes) > 0.01:
        pytest.skip("this filesystem keeps its pages in memory (tmpfs?)")
    for name, want in tensors.items():
        for rows in (None, slice(0, 1), slice(want.shape[0] // 3, want.shape[0])):
            _, _, nbytes = r.entries[name].rows(rows)
            got = r.read(name, rows, into=aligned_buffer(direct_room(nbytes)))
            expected = want if rows is None else want[rows]
            assert got.dtype == want.dtype and torch.equal(got, expected), (name, rows)
        r.prefetch(name, direct=True)  # a tensor read into buffers is not prefetched either
    assert _cached_fraction(path, 0, size) == before and _cached_fraction(path, t3.offset, t3.nbytes) == 0
    r.close()


def test_reads_are_mapped_where_the_filesystem_refuses_direct_reads(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused at open (tmpfs before Linux 6.6) or at the first read (EINVAL): the same bytes, mapped,
    and a tensor read into buffers is prefetched again, as the mapped read needs."""
    path = tmp_path / "odd.safetensors"
    tensors = _odd_tensors()
    _written(path, tensors)
    real_open, real_preadv = os.open, os.preadv

    def refuse_open(file, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_open(file, flags, *args)

    def refuse_read(fd, buffers, offset):
        raise OSError(22, "Invalid argument")

    for refuse in ("open", "read"):
        with monkeypatch.context() as m:
            m.setattr(os, "open", refuse_open) if refuse == "open" else m.setattr(os, "preadv", refuse_read)
            r = ShardReader(path)
            for name, want in tensors.items():
                into = aligned_buffer(direct_room(r.entries[name].nbytes))
                assert torch.equal(r.read(name, into=into), want), refuse
        _evicted(path)
        if _cached_fraction(path, r.entries["t3"].offset, r.entries["t3"].nbytes) > 0.01:
            pytest.skip("this filesystem keeps its pages in memory (tmpfs?)")
        r.prefetch("t3", direct=True)
        t3, deadline = r.entries["t3"], time.monotonic() + 20
        while _cached_fraction(path, t3.offset, t3.nbytes) < 0.9 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _cached_fraction(path, t3.offset, t3.nbytes) > 0.9, refuse
        r.close()
    assert real_preadv is os.preadv


def test_a_direct_read_of_a_file_cut_short_names_it(tmp_path: Path) -> None:
    path = tmp_path / "odd.safetensors"
    tensors = _odd_tensors()
    _written(path, tensors)
    r = ShardReader(path)
    os.truncate(path, r.entries["t4"].offset + 100)
    e = r.entries["t4"]
    with pytest.raises(CheckpointError, match=f"{path}: unexpected end of file at byte {e.offset + 100} "):
        r.read("t4", into=aligned_buffer(direct_room(e.nbytes)))
    r.close()
