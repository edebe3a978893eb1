"""Test helper: run a merge and SIGKILL this very process at a chosen point.

    python crash_child.py PLAN OUT POINT N

POINT is ``write`` (after the N-th chunk is written to a shard), ``record`` (after the N-th tensor
is journaled), ``finalize`` (after the N-th model file is written) or ``task`` (after the driver of
a ``executor: ray`` plan got the N-th task's result). Nothing is cleaned up: the
kill is as abrupt as a preempted session's. Exits 3 if the merge finished before the point came.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import streammerge
from streammerge.io.writer import ShardWriter, StagedOutput
from streammerge.journal import Journal

POINTS = {"write": (ShardWriter, "write"), "record": (Journal, "record"), "finalize": (StagedOutput, "write_text")}


def kill_after(cls: type, method: str, n: int) -> None:
    original = getattr(cls, method)
    calls = 0

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        result = original(*args, **kwargs)
        calls += 1
        if calls == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(cls, method, counted)


if __name__ == "__main__":
    plan, out, point, n = sys.argv[1:]
    if point == "task":
        import ray

        POINTS["task"] = (ray, "get")
    kill_after(*POINTS[point], int(n))
    streammerge.merge(plan, out, quiet=True)
    sys.exit(3)
