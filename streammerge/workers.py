"""Chunks of a tensor merged side by side, one thread each, results in row order.

A chunk's kernels are dozens of elementwise torch ops over a few MB each. Split across cores op by
op (torch's intra-op threads), every op ends in a barrier and much of the time goes to waiting:
on two cores a 7B-shaped DARE-TIES tensor ran only 1.4x faster with two threads than with one.
Whole chunks on separate threads, each with torch on one thread, share nothing but the GIL, which
torch releases inside every op. Results are combined in row order, so the output does not depend
on the number of workers.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


def in_flight(n: int) -> int:
    """Items ``ChunkWorkers(n).map`` holds at once: one running and one queued per worker, so a
    worker that finishes starts the next item at once, while the caller still handles the result
    it waits for (which need not come first: it waits in order)."""
    return 2 * n if n > 1 else 1


class ChunkWorkers:
    """``map(fn, items)`` runs ``fn`` on up to ``n`` items at once and yields the results in
    order. It takes an item only when there is room for it, so ``items`` can read chunks lazily:
    at most ``in_flight(n)`` are taken and not yet handed back."""

    def __init__(self, n: int):
        self.n = n
        self._pool = ThreadPoolExecutor(n, thread_name_prefix="streammerge-merge") if n > 1 else None

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        if self._pool is None:
            yield from map(fn, items)
            return
        pending: deque[Future[R]] = deque()
        rest = iter(items)
        try:
            while True:
                for item in itertools.islice(rest, in_flight(self.n) - len(pending)):
                    pending.append(self._pool.submit(fn, item))
                if not pending:
                    return
                yield pending.popleft().result()
        finally:  # on an error, the chunks still merging finish before their memory is needed again
            for f in pending:
                f.cancel()
            for f in pending:
                if not f.cancelled():
                    f.exception()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


@contextlib.contextmanager
def chunk_workers(n: int) -> Iterator[ChunkWorkers]:
    """``n`` workers; with more than one, torch runs each op on one thread meanwhile (a thread
    takes torch's thread count when it first runs an op, so this comes before any worker starts)."""
    threads = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    workers = ChunkWorkers(n)
    try:
        yield workers
    finally:
        workers.close()
        torch.set_num_threads(threads)
