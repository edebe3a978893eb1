"""Faults injected into Ray workers by the tests (a ``worker_process_setup_hook`` runs in each
worker as it starts; tests/ reaches the workers on ``PYTHONPATH``). Each hook wraps
``ShardWriter.write``, the moment a task's bytes reach its shard file."""

from __future__ import annotations

import os
import time
from pathlib import Path

from streammerge.io.writer import ShardWriter

_write = ShardWriter.write


def exit_mid_write() -> None:
    """The first worker to write chunk ``SMR_CRASH_AT`` of shard ``SMR_CRASH_SHARD`` exits at once
    after it, as a killed process would; ``SMR_CRASH_MARKER`` (created then) keeps every later
    attempt from crashing."""
    marker, shard = Path(os.environ["SMR_CRASH_MARKER"]), os.environ["SMR_CRASH_SHARD"]
    at = int(os.environ["SMR_CRASH_AT"])
    writes = 0

    def write(self: ShardWriter, offset: int, tensor) -> None:
        nonlocal writes
        _write(self, offset, tensor)
        if self.path.name == shard:
            writes += 1
            if writes == at and not marker.exists():
                marker.write_text(str(os.getpid()))
                os._exit(1)

    ShardWriter.write = write


def slow_writes() -> None:
    """Each chunk written takes ``SMR_WRITE_SECONDS`` longer, so that tasks are still running when
    a test removes a node, and first touches ``SMR_TRACE_DIR/<node id>.<shard>``: a task is
    writing that shard there."""
    import ray

    pause, trace = float(os.environ["SMR_WRITE_SECONDS"]), Path(os.environ["SMR_TRACE_DIR"])

    def write(self: ShardWriter, offset: int, tensor) -> None:
        (trace / f"{ray.get_runtime_context().get_node_id()}.{self.path.name}").touch()
        time.sleep(pause)
        _write(self, offset, tensor)

    ShardWriter.write = write
