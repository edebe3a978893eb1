"""Run a schedule: for each output tensor, read its inputs chunk by chunk, merge, write.

The engine knows nothing about any method: it runs the method's statistics passes over the row
chunks, then its merge, and writes each merged chunk at its precomputed offset. Every read the run
will make is known from the schedule, so a reader thread performs them in that order, a few chunks
ahead of the merge and two at a time; on the CPU, workers merge several chunks at once
(``streammerge.workers``); and a writer thread checks, hashes and writes each merged chunk while
the next ones merge: reading and writing hide behind compute. On the CPU every read goes past the
page cache into the reader's buffers (``_reads_direct``). On a GPU the reader thread also starts
each chunk's copy to the device, results come back through pinned buffers
(``streammerge.transfer``), and a tensor read by several passes is read through the page cache: a
prefetch thread has the disk read it while the tensor before merges, and the passes map it. A
tensor whose merge runs out of memory is merged again in chunks of half as many rows.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import math
import queue
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import torch
from tqdm import tqdm

from streammerge.errors import CheckpointError, OutputError, StreamMergeError
from streammerge.io.reader import aligned_buffer, direct_room
from streammerge.io.rows import read_mapped
from streammerge.io.write_behind import WriteBehind
from streammerge.io.writer import ShardWriter, StagingDirectory
from streammerge.methods import Chunk, compiled, run_passes
from streammerge.schedule import READ_AHEAD_CHUNKS, Schedule, Source, TensorJob
from streammerge.sources.feed import ShardFeed
from streammerge.statistics import WEIGHT_SHAPED, JobStatistics
from streammerge.transfer import DeviceToHost, HostToDevice, InFlight, chunk_layout
from streammerge.workers import ChunkWorkers, chunk_workers, in_flight

if TYPE_CHECKING:
    from streammerge.executors.task import TaskResult


SWITCH_INTERVAL = 2e-4  # seconds a thread may hold the GIL while another waits for it, during a merge
PREFETCH_AHEAD_BYTES = 64 << 20  # inputs queued for the page cache beyond the tensor merging
READ_THREADS = 2  # chunks read at once (``_ChunkReader``)


@dataclass(frozen=True)
class MergeResult:
    output: Path
    tensors: int
    shards: int
    bytes_read: int
    bytes_written: int
    seconds: float
    sync_seconds: float  # of ``seconds``, spent making the output durable (fsync)
    notes: tuple[str, ...]
    device: str = "cpu"  # where the kernels ran, e.g. "cuda:0 (NVIDIA H100 80GB HBM3)" or "cpu (no CUDA)"
    peak_gpu_bytes: int | None = None  # torch.cuda.max_memory_allocated during the merge
    up_to_date: bool = False  # the output already held this merge: nothing was read or written
    inputs: tuple[str, ...] = ()  # the models read (resolved references: ``dir`` or ``dir+adapter``)
    download_seconds: float = 0.0  # downloading Hub shards (alongside the merge under a disk budget)
    merge_seconds: float = 0.0  # merging, waits for downloads excluded (``seconds`` is the wall time)
    tasks: tuple[TaskResult, ...] = ()  # with --executor ray: each task's shards, node, time and bytes


@dataclass(frozen=True)
class RunReport:
    sync_seconds: float  # spent in the final fsync
    notes: tuple[str, ...]  # tensors merged again in smaller chunks after running out of memory
    peak_gpu_bytes: int | None


def _row_ranges(job: TensorJob) -> list[tuple[int, int]]:
    return [(start, min(start + job.rows_per_chunk, job.rows)) for start in range(0, job.rows, job.rows_per_chunk)]


def _read_source(schedule: Schedule, job: TensorJob, src: Source, start: int, stop: int,
                 into: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [start, stop) of one input (read into ``into``, if given, where the reader can); rows
    past a shorter input's end come from ``inputs[0]``."""
    ckpt = schedule.checkpoints[src.checkpoint]
    if not job.shape:
        return ckpt.read(src.tensor)
    if src.row_map is not None:
        return read_mapped(schedule.checkpoints, src.checkpoint, src.tensor, src.row_map, start, stop, job.load_dtype)
    if src.rows is None or stop <= src.rows:
        return ckpt.read(src.tensor, slice(start, stop), into)
    own = ckpt.read(src.tensor, slice(start, max(start, src.rows)))
    fill = _read_source(schedule, job, job.inputs[0], max(start, src.rows), stop)
    return torch.cat([own, fill.to(own.dtype)])


def _all_finite(x: torch.Tensor) -> bool:
    """No NaN or Inf in ``x``: compiled, a comparison of each exponent field (0.026 ns an element of
    a bfloat16 chunk, against 0.065 for torch's sum); else any of them makes the sum non-finite,
    and a sum is ~20x cheaper than ``isfinite``; only a sum that overflows on its own needs the
    exact check."""
    if not x.is_floating_point():
        return True
    if compiled.supports(x):
        return compiled.all_finite(x)
    return bool(x.sum().isfinite()) or bool(torch.isfinite(x).all())


def _chunk_bytes(schedule: Schedule, job: TensorJob, rows: int) -> list[int]:
    """Bytes of each input's ``rows`` rows, as stored."""
    row = math.prod(job.shape[1:]) if job.shape else 1
    return [rows * row * schedule.checkpoints[s.checkpoint].tensors[s.tensor].dtype.itemsize for s in job.inputs]


def _row_statistics(job: TensorJob) -> list[str]:
    """The weight-shaped statistics kinds ``job`` reads per chunk, after its inputs."""
    return [k for k in job.statistics if k in WEIGHT_SHAPED]


def _statistics_bytes(job: TensorJob, rows: int) -> list[int]:
    row = math.prod(job.shape[1:]) if job.shape else 1
    return [rows * row * 4] * (len(_row_statistics(job)) * len(job.merged_inputs))


def _reads_direct(job: TensorJob, on_gpu: bool) -> bool:
    """Whether ``job``'s inputs are read into the reader's buffers past the page cache (``O_DIRECT``
    where the filesystem allows it) rather than prefetched into it and mapped: those read as stored,
    on a GPU only when every byte is read once (one pass, or one chunk).

    A statistics pass and the merge read each input twice. On the CPU, reading it twice from the disk
    cost 16-24% less CPU than the page cache's work (readahead, mapping, dropping), for a wall time
    within this VM's noise: a 32-layer 7B-shaped TIES merge 1.79-1.88 against 2.35 CPU-s per GB and
    4-13% longer in the README's benchmark (61.3 s against 63.9 s, shorter, in another pair), slerp
    3.25-3.29 against 3.46-3.57 and 3-4% shorter. On a GPU, where the disk and not the CPU sets the
    pace, the second pass reads from the page cache."""
    once = job.method is None or job.rows <= job.rows_per_chunk or not job.method.passes_for(job.params)
    return (once or not on_gpu) and all(s.rows is None and s.row_map is None for s in job.inputs)


def _input_layout(schedule: Schedule, job: TensorJob, rows: int) -> tuple[list[int], int]:
    """Where each input of a chunk of ``rows`` rows lands in the reader's buffer, with room for a
    read widened to whole pages (``direct_room``), and the buffer's size."""
    return chunk_layout([direct_room(n) for n in _chunk_bytes(schedule, job, rows)])


def _read(schedule: Schedule, job: TensorJob, start: int, stop: int, check: bool, buffer: torch.Tensor) -> list[torch.Tensor]:
    """The chunk's raw inputs, read into ``buffer`` if they are read past the page cache, then its
    rows of each merged model's weight-shaped statistics (float32); with ``check``, refused if an
    input holds NaN or Inf."""
    offsets, total = _input_layout(schedule, job, stop - start)
    into = _reads_direct(job, schedule.device.is_cuda) and total <= buffer.numel()
    out = []
    for src, at in zip(job.inputs, offsets):
        raw = _read_source(schedule, job, src, start, stop, buffer[at:] if into else None)
        if check and not schedule.plan.allow_nonfinite and not _all_finite(raw):
            ckpt = schedule.checkpoints[src.checkpoint]
            raise CheckpointError(f"{ckpt.file_of(src.tensor)}: tensor {src.tensor!r} holds NaN or Inf; "
                                  "fix the input, or pass --allow-nonfinite (allow_nonfinite: true) to merge it as it is")
        out.append(raw)
    rows = slice(start, stop) if job.shape else None
    for kind in _row_statistics(job):
        out += [schedule.statistics[src.checkpoint].read(src.tensor, kind, rows) for src in job.merged_inputs]
    return out


def _loaded(schedule: Schedule, job: TensorJob, raw: torch.Tensor) -> torch.Tensor:
    """An input as the method loads it: rounded to the plan's dtype (``Chunk`` widens it on use)."""
    if schedule.plan.compute_dtype == "auto":
        return raw.to(job.load_dtype)  # mergekit rounds inputs to `dtype` on load
    return raw


class _ChunkReader:
    """Reads the row chunks of requested jobs in a background thread, in request order, at most
    ``depth`` chunks ahead of the consumer. ``request(job)`` asks for one pass over the job's rows.
    With ``to_device`` the inputs of merged tensors are sent on to the GPU as they are read.

    ``READ_THREADS`` chunks are read at once. A direct read has no readahead behind it: read one at
    a time, the disk idled while the reader thread waited for the GIL between reads, and an 8-layer
    7B-shaped task_arithmetic merge read at 0.8 GB/s (16.4-16.6 s); two at a time, 13.1-13.7 s.

    A job read past the page cache (``_reads_direct``) is read into a page-aligned buffer of
    ``buffer_bytes`` (the largest chunk) that the consumer allocated when it took the chunk before:
    made in the merging thread between its chunks, all of one size, these buffers reuse each
    other's memory instead of landing between the merge's temporaries, where the reader thread's
    own allocations fragmented the heap. Other jobs are mapped from the page cache.

    With a ``feed``, each job's Hub shards are waited for before its first read."""

    def __init__(self, schedule: Schedule, depth: int, buffer_bytes: int,
                 to_device: HostToDevice | None = None, feed: ShardFeed | None = None):
        self._schedule = schedule
        self._feed = feed
        self._to_device = to_device
        self._buffer_bytes = buffer_bytes
        self._buffers: queue.Queue[torch.Tensor] = queue.Queue()
        for _ in range(depth + 1):  # the chunks read ahead, and the one being read
            self._buffers.put(aligned_buffer(buffer_bytes))
        self._requests: queue.Queue = queue.Queue()
        self._chunks: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="streammerge-reader", daemon=True)
        self._thread.start()

    def request(self, job: TensorJob) -> None:
        self._requests.put(job)

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._chunks.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        checked = None  # the job whose inputs were checked: its later passes read the same bytes
        reading: deque[tuple[Future, TensorJob]] = deque()  # chunks being read, in request order
        pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="streammerge-read")
        try:
            while (job := self._next_request(reading)) is not None:
                if self._feed is not None:
                    self._feed.wait(job, self._stop)
                check, checked = job.name != checked, job.name
                for start, stop in _row_ranges(job):
                    if (buffer := self._buffer()) is None:
                        return
                    reading.append((pool.submit(_read, self._schedule, job, start, stop, check, buffer), job))
                    del buffer  # the chunk's tensors hold it while they live
                    if len(reading) == READ_THREADS and not self._hand_over(*reading.popleft()):
                        return
        except BaseException as e:  # handed to the consumer, raised where the data is wanted
            self._put(e)
        finally:
            pool.shutdown(cancel_futures=True)

    def _next_request(self, reading: deque[tuple[Future, TensorJob]]) -> TensorJob | None:
        """The next job to read; before waiting for one, every chunk being read is handed over."""
        try:
            return self._requests.get_nowait()
        except queue.Empty:
            while reading:
                if not self._hand_over(*reading.popleft()):
                    return None
            return self._requests.get()

    def _hand_over(self, read: Future, job: TensorJob) -> bool:
        """Queue a chunk for the consumer once read (on a GPU, once its copy there has started)."""
        chunk: list[torch.Tensor] | InFlight = read.result()
        if self._to_device is not None and job.method is not None:
            chunk = self._to_device.send(chunk)
        return self._put(chunk)

    def _buffer(self) -> torch.Tensor | None:
        while not self._stop.is_set():
            try:
                return self._buffers.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def next(self) -> list[torch.Tensor]:
        item = self._chunks.get()
        self._buffers.put(aligned_buffer(self._buffer_bytes))
        if isinstance(item, BaseException):
            raise item
        return item.arrive() if isinstance(item, InFlight) else item

    def close(self) -> None:
        self._stop.set()
        self._requests.put(None)
        self._thread.join()
        while not self._chunks.empty():  # chunks read ahead are freed now (on a GPU, before a retry needs the memory)
            self._chunks.get_nowait()


def _chunk(schedule: Schedule, job: TensorJob, raw: list[torch.Tensor], start: int, stop: int,
           prepared: tuple[dict[str, Any], ...] = ()) -> Chunk:
    """The chunk a method sees: inputs as loaded, widened to the compute dtype when the method
    reads them (in a worker, not in the reader thread, so read-ahead holds the smaller raw bytes),
    and per model its statistics: what the method prepared for the tensor and this chunk's rows of
    the weight-shaped ones."""
    n = len(job.inputs)
    tensors = [_loaded(schedule, job, t) for t in raw[:n]]
    base = tensors[0] if job.has_base else None
    models = tensors[1:] if job.has_base else tensors
    calibration: tuple[dict[str, Any], ...] = ()
    if job.statistics:
        calibration = tuple(dict(p) for p in prepared) or tuple({} for _ in models)
        for k, kind in enumerate(_row_statistics(job)):
            for i, c in enumerate(calibration):
                c[kind] = raw[n + k * len(models) + i]
    return Chunk(job.name, job.shape, base, models, job.params, start, stop, schedule.plan.seed,
                 job.model_ids, wide=schedule.plan.compute_dtype != "auto", calibration=calibration,
                 compute_dtype=job.compute_dtype)


def _with_kept_rows(job: TensorJob, raw: list[torch.Tensor], start: int, stop: int,
                    merged: torch.Tensor) -> torch.Tensor:
    """``merged`` (rows [start, stop), in the output dtype) with the job's kept rows replaced by
    ``inputs[kept_from]``'s, rounded to the output dtype as a copied tensor is."""
    rows = [r - start for r in job.kept_rows if start <= r < stop]
    if rows:
        at = torch.tensor(rows, device=merged.device)
        merged[at] = raw[job.kept_from][at.to(raw[job.kept_from].device)].to(merged.device, job.out_dtype)
    return merged


def _prepared(schedule: Schedule, job: TensorJob, note: Callable[[str], None]) -> tuple[dict[str, Any], ...]:
    """What ``job``'s method makes of its whole-tensor statistics, once per tensor, on the merge's device."""
    prepare = job.method.statistics.prepare if job.statistics and job.method.statistics is not None else None
    if prepare is None:
        return ()
    sources = tuple((schedule.statistics[s.checkpoint], s.tensor) for s in job.merged_inputs)
    with _large_blocks_mapped():
        prepared = prepare(job.params, JobStatistics(job.name, job.shape, sources, note))
    device = schedule.device.torch
    return tuple({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in p.items()} for p in prepared)


def merge_tensor(schedule: Schedule, job: TensorJob, write: Callable[[int, torch.Tensor], None],
                 reader: _ChunkReader, request_next: Callable[[], None], workers: ChunkWorkers,
                 note: Callable[[str], None] = lambda text: None) -> None:
    """Merge one output tensor, calling ``write(row_start, tensor)`` for each finished chunk, in
    row order; ``workers`` run the passes and the merge on several chunks at once.

    One pass over the job's rows is already requested from ``reader``. Each pass requests the
    next before it starts: every pass reads the same rows, so whether a statistics pass or the
    merge follows, the read ahead is right. The last pass requests the next job's (``request_next``).
    A tensor in one chunk is read once and kept for every pass."""
    ranges = _row_ranges(job)
    if job.method is None:
        request_next()
        for start, stop in ranges:
            write(start, reader.next()[0].to(job.load_dtype).to(job.out_dtype))
        return
    prepared = _prepared(schedule, job, note)
    if len(ranges) == 1:
        tensors = reader.next()
        request_next()
        whole = _chunk(schedule, job, tensors, *ranges[0], prepared)
        merged = job.method.merge(whole, run_passes(job.method.passes_for(job.params), lambda: [whole]))
        write(0, _with_kept_rows(job, tensors, *ranges[0], merged.to(job.out_dtype)))
        return

    def raw_chunks() -> Iterator[tuple[list[torch.Tensor], int, int]]:
        reader.request(job)
        for start, stop in ranges:
            yield reader.next(), start, stop

    def on_workers(f: Callable[[Chunk], Any], items: Iterable[tuple[list[torch.Tensor], int, int]]) -> Iterator[Any]:
        """``f`` over the chunks made from ``items``, made in the workers too (the conversion to the compute dtype is work)."""
        return workers.map(lambda item: f(_chunk(schedule, job, *item, prepared)), items)

    stats = run_passes(job.method.passes_for(job.params), raw_chunks, on_workers)
    request_next()

    def merge_chunk(item: tuple[list[torch.Tensor], int, int]) -> torch.Tensor:
        merged = job.method.merge(_chunk(schedule, job, *item, prepared), stats).to(job.out_dtype)
        return _with_kept_rows(job, *item, merged)

    merged = workers.map(merge_chunk, ((reader.next(), *r) for r in ranges))
    for (start, _), out in zip(ranges, merged):
        write(start, out)


def _glibc() -> ctypes.CDLL | None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return libc if hasattr(libc, "mallopt") else None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -3, -4, -8


@contextlib.contextmanager
def _reuse_freed_memory() -> Iterator[None]:
    """Keep freed chunk buffers in the heap for the next chunk (glibc) instead of unmapping them.

    Chunks are tens of MB: by default glibc serves each from a fresh mmap and unmaps it on free,
    so every chunk pays a page fault per 4 KiB page; measured on a 7B-shaped TIES merge that was
    as much system time as compute. The heap's high-water mark stays a few chunks."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_ARENA_MAX, 1)  # the reader thread's buffers come back to the same heap, not a second one
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, 65536)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
        libc.malloc_trim(0)


@contextlib.contextmanager
def _frozen_heap() -> Iterator[None]:
    """Python's cyclic garbage collector leaves the objects alive before the merge alone (``gc.freeze``)
    until it ends: every chunk makes a few hundred objects, and each full collection walked the
    hundreds of thousands torch's import made as well: 3.6% of an 8-layer task_arithmetic merge's
    CPU time (``gc_collect_main`` and its visits, in ``perf``). No collection first: in a process
    that merges many times (the test suite) a full one per merge added minutes."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def _large_blocks_mapped() -> Iterator[None]:
    """While a method prepares whole-tensor statistics, blocks of 32 MiB (glibc's largest mmap
    threshold) and more get mappings of their own again, returned to the system when freed.

    In the heap ``_reuse_freed_memory`` keeps, a freed [in, in] Gram (462 MiB for a 7B down_proj)
    is split by the chunks that follow and the next one grows the heap: a 4-layer ties merge with
    sparsegpt importance climbed from 1.1 to 2.56 GiB over its four down_projs."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    libc.mallopt(_M_MMAP_MAX, 65536)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, 0)


def _return_free_heap() -> None:
    """Hand the heap's free pages back to the system (glibc's ``malloc_trim``).

    Called after each tensor merged with statistics: chunk sizes change from tensor to tensor and,
    with whole-tensor statistics prepared in between, the heap ``_reuse_freed_memory`` keeps grew
    by about 100 MiB per layer of a 7B-shaped regmean merge (388 to 581 MiB between tensors over
    three layers). Those tensors take seconds each; the page faults after a trim are noise there."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _prefetch_order(input_bytes: list[int], ahead: int = PREFETCH_AHEAD_BYTES) -> list[range]:
    """For each job, the jobs whose inputs to prefetch as it starts: the following ones not queued
    yet, until the inputs queued beyond it total ``ahead`` bytes, and at least the next one.

    Looking only at the next job was not enough: a norm merges at once, so the matrix after it
    started cold (k_proj took 0.46-0.72 s against 0.29-0.46 s for q/v/o_proj of its size)."""
    order, queued = [], 1
    for k in range(len(input_bytes)):
        start = max(queued, k + 1)
        end, total = start, sum(input_bytes[k + 1:start])
        while end < len(input_bytes) and total < ahead:
            total += input_bytes[end]
            end += 1
        order.append(range(start, end))
        queued = end
    return order


@contextlib.contextmanager
def _prefetching(schedule: Schedule) -> Iterator[Callable[[TensorJob], None]]:
    """``prefetch(job)`` has the disk read ``job``'s inputs into the page cache, queued from a thread
    of its own: queueing blocks while the device's queue is full (in the merging thread that took
    1.7 s of a 4-layer TIES merge). What is still queued on exit is dropped; it was only a hint."""
    stop = threading.Event()
    pool = ThreadPoolExecutor(1, thread_name_prefix="streammerge-prefetch")

    def prefetch(job: TensorJob) -> None:
        for src in job.inputs:
            pool.submit(schedule.checkpoints[src.checkpoint].prefetch, src.tensor, stop,
                        _reads_direct(job, schedule.device.is_cuda))

    try:
        yield prefetch
    finally:
        stop.set()
        pool.shutdown(cancel_futures=True)


@contextlib.contextmanager
def _prompt_thread_switches() -> Iterator[None]:
    """Hand the GIL over within 0.2 ms instead of Python's 5 ms.

    A thread coming back from ``pread`` or a torch op waits for the GIL; when the workers keep
    taking it back between their short ops, it waits the whole switch interval each time. The
    reader thread, which needs the GIL a few times per chunk, fell behind: a 2-layer 7B-shaped
    linear merge took 11.4-12.1 s with the default and 9.5-9.8 s with 0.2 ms."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


def _writing(schedule: Schedule, job: TensorJob, writer: ShardWriter, bar: tqdm) -> Callable[[int, torch.Tensor], None]:
    """``write(row_start, tensor)`` for ``job``'s rows (bound to the job: a writer thread may call it later)."""
    row_bytes = math.prod(job.shape[1:]) * job.out_dtype.itemsize if job.shape else 0

    def write(row_start: int, tensor: torch.Tensor) -> None:
        if not schedule.plan.allow_nonfinite and not _all_finite(tensor):
            raise OutputError(f"tensor {job.name!r}: the merged result holds NaN or Inf (an overflow?); try "
                              "compute_dtype: float32 or a wider out_dtype, or pass --allow-nonfinite to write it")
        writer.write(job.offset + row_start * row_bytes, tensor)
        bar.update(tensor.numel() * tensor.element_size())

    return write


def _halved(schedule: Schedule, job: TensorJob) -> TensorJob:
    """``job`` in chunks of half as many rows, after it ran out of memory; an error at one row."""
    rows = min(job.rows_per_chunk, job.rows)
    if rows <= 1:
        budget = (f"--max-gpu-memory {schedule.device_budget / 2**30:.2f} GiB for chunks" if schedule.device_budget is not None
                  else "--max-memory " + (f"{schedule.plan.max_memory / 2**30:.2f} GiB" if schedule.plan.max_memory else "unset"))
        raise StreamMergeError(f"tensor {job.name!r}: out of memory on {schedule.device.description} even one row per chunk "
                               f"({budget}); free memory there (other processes?) or use --device cpu")
    return replace(job, rows_per_chunk=rows // 2)


def _largest_chunk(schedule: Schedule) -> tuple[int, int]:
    """Bytes of the largest chunk's inputs, laid out as ``chunk_layout`` lays them, and of its output."""
    inputs = out = 0
    for j in schedule.jobs:
        rows = min(j.rows_per_chunk, j.rows)
        statistics = chunk_layout(_statistics_bytes(j, rows))[1]
        inputs = max(inputs, _input_layout(schedule, j, rows)[1] + statistics)
        out = max(out, rows * (math.prod(j.shape[1:]) if j.shape else 1) * j.out_dtype.itemsize)
    return inputs, out


def _transfers(schedule: Schedule, inputs: int, out: int) -> tuple[HostToDevice | None, DeviceToHost | WriteBehind]:
    """The GPU's copy pipelines, with pinned buffers of ``inputs`` and ``out`` bytes; on the CPU,
    no copies in and a writer thread out, with a buffer for each chunk that merges at once and one
    being written (the workers finish chunks in bursts; with two buffers the merging thread waited
    0.9-2.8 s of a 20 s 4-layer TIES merge for one, and handed the workers no new chunk meanwhile)."""
    if not schedule.device.is_cuda:
        return None, WriteBehind(out, in_flight(schedule.workers) + 1)
    torch.cuda.reset_peak_memory_stats(schedule.device.torch)
    return HostToDevice(schedule.device.torch, inputs), DeviceToHost(schedule.device.torch, out)


def run_schedule(schedule: Schedule, staged: StagingDirectory, quiet: bool = False,
                 finished: frozenset[str] = frozenset(),
                 done: Callable[[TensorJob, ShardWriter], None] | None = None,
                 feed: ShardFeed | None = None) -> RunReport:
    """Write the schedule's tensors into their shards in the staging directory, skipping the ``finished``
    tensors (already written by an earlier run) and calling ``done`` after each one written.
    With a ``feed``, its jobs run in its order, each once its Hub shards are downloaded, and the
    feed is told when a job's inputs are read (the writes' offsets do not depend on the order)."""
    jobs = [j for j in (schedule.jobs if feed is None else feed.jobs) if j.name not in finished]
    prefetch_order = _prefetch_order([sum(_chunk_bytes(schedule, j, j.rows)) for j in jobs])
    writers = {k: ShardWriter(staged.path(schedule.shards[k].filename), schedule.shards[k].header,
                              schedule.shards[k].size) for k in sorted({j.shard for j in jobs})}
    notes: list[str] = []
    with (_frozen_heap(), _reuse_freed_memory(), _prompt_thread_switches(),
          chunk_workers(schedule.workers) as workers,
          _prefetching(schedule) as prefetch):
        read_bytes, out_bytes = _largest_chunk(schedule)
        to_device, writes = _transfers(schedule, read_bytes, out_bytes)
        reader = _ChunkReader(schedule, READ_AHEAD_CHUNKS, read_bytes, to_device, feed)
        if jobs:
            reader.request(jobs[0])
        try:
            with tqdm(total=schedule.write_bytes, unit="B", unit_scale=True, unit_divisor=1024, disable=quiet,
                      desc="merging", dynamic_ncols=True) as bar:
                bar.update(sum(j.out_bytes for j in schedule.jobs if j.name in finished))
                for k, job in enumerate(jobs):
                    writer = writers[job.shard]
                    write = _writing(schedule, job, writer, bar)
                    write = partial(writes.write, write)

                    def request_next(k: int = k) -> None:
                        if k + 1 < len(jobs):
                            reader.request(jobs[k + 1])

                    for ahead in prefetch_order[k]:  # the disk reads the next tensors while this one merges on the CPU
                        prefetch(jobs[ahead])
                    first_rows = min(job.rows_per_chunk, job.rows)
                    while True:
                        try:
                            merge_tensor(schedule, job, write, reader, request_next, workers, notes.append)
                            break
                        except torch.OutOfMemoryError:
                            job = _halved(schedule, job)
                        reader.close()  # its read-ahead is of the failed chunking; chunks already written are rewritten, same bytes
                        if schedule.device.is_cuda:
                            torch.cuda.empty_cache()
                        reader = _ChunkReader(schedule, READ_AHEAD_CHUNKS, read_bytes, to_device,
                                              feed)
                        reader.request(job)
                    if job.rows_per_chunk < first_rows:
                        notes.append(f"tensor {job.name!r}: out of memory in chunks of {first_rows} rows; "
                                     f"merged in chunks of {job.rows_per_chunk}")
                    for src in job.inputs:
                        schedule.checkpoints[src.checkpoint].release(src.tensor)
                    if feed is not None:  # its shards no later job reads are deleted
                        feed.done(job)
                    if job.statistics:
                        _return_free_heap()
                    if done is not None:  # once the writer thread has written the tensor's last chunk
                        writes.then(partial(done, job, writer))
                writes.drain()
                bar.update(sum(len(s.header) for s in schedule.shards))
        finally:
            reader.close()
            writes.close()
            synced = time.perf_counter()
            for w in writers.values():
                w.close()
    peak = torch.cuda.max_memory_allocated(schedule.device.torch) if schedule.device.is_cuda else None
    return RunReport(time.perf_counter() - synced, tuple(notes), peak)
