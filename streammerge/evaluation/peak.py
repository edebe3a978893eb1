"""The peak resident memory of this process over a stretch of work, sampled from a thread.

``ru_maxrss`` is the peak over the process's whole life, so it cannot tell an evaluation's peak
from the merge that ran before it in the same process; sampling can, to within the interval.
"""

from __future__ import annotations

import threading

import psutil

_INTERVAL = 0.01  # seconds: allocations that live shorter than this can be missed


class PeakRss:
    def __init__(self) -> None:
        self._process = psutil.Process()
        self.bytes = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="streammerge-peak-rss", daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(_INTERVAL):
            self.bytes = max(self.bytes, self._process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.bytes = max(self.bytes, self._process.memory_info().rss)
