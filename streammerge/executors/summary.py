"""What a scale-out run reports: its tasks per node, their time and bytes, and the wall time."""

from __future__ import annotations

import statistics
from collections import defaultdict

from streammerge.cli_common import aligned_table
from streammerge.executors.task import TaskResult


def task_summary(tasks: tuple[TaskResult, ...], wall_seconds: float) -> str:
    """A table with a row per node: its tasks, the bytes they read and wrote, the seconds a task
    took there (median and slowest) and the largest peak RSS of a worker that ran them."""
    nodes: dict[tuple[str, str], list[TaskResult]] = defaultdict(list)
    for t in tasks:
        nodes[(t.node, t.host)].append(t)
    head = ("node", "tasks", "read GiB", "written GiB", "median s/task", "slowest s/task",
            "peak RSS GiB")
    rows = [(f"{node[:12]} ({host})", str(len(ts)), f"{sum(t.bytes_read for t in ts) / 2**30:.2f}",
             f"{sum(t.bytes_written for t in ts) / 2**30:.2f}",
             f"{statistics.median(t.seconds for t in ts):.1f}", f"{max(t.seconds for t in ts):.1f}",
             f"{max(t.peak_rss for t in ts) / 2**30:.2f}")
            for (node, host), ts in sorted(nodes.items())]
    return (f"{len(tasks)} Ray task(s) on {len(nodes)} node(s) in {wall_seconds:.1f} s:\n"
            + aligned_table(head, rows))
