"""The Ray executor: each output shard (or ``shards_per_task`` of them) is one Ray task
(``streammerge.executors.task``), spread over the cluster's nodes.

Ray runs the tasks, retries one whose worker or node died (``MAX_RETRIES`` times: its journal
resumes it) and hands back their small results; a task that fails for good (an error in the
inputs, say) stops the run with its shard and its error in one line, the staging directory kept
for the same command to resume. Only core Ray tasks are used (plain ``pip install ray``): no
object holds a tensor, and nothing here needs the dashboard.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import replace
from types import ModuleType
from typing import Iterator

from tqdm import tqdm

from streammerge.errors import MissingExtraError, StreamMergeError
from streammerge.executors.local import remove_stale_downloads
from streammerge.executors.task import ShardTask, TaskResult, run_task
from streammerge.io.writer import StagingDirectory
from streammerge.journal import Journal
from streammerge.schedule import Schedule

MAX_RETRIES = 3  # attempts after a task's worker or node died (Ray's default)
CPUS_PER_TASK = 1
WAIT_SECONDS = 0.5  # between looks at the running tasks (the progress bar's refresh)
CANCEL_WAIT_SECONDS = 30.0  # for cancelled tasks to stop before the staging directory is unlocked


def import_ray() -> ModuleType:
    try:
        import ray
    except ImportError:
        raise MissingExtraError("--executor ray needs Ray: pip install 'streammerge[ray]'") from None
    return ray


def _run_on_node(task: ShardTask) -> TaskResult:
    """``run_task`` in a Ray worker, its result labelled with the node it ran on."""
    import ray

    result = run_task(task)
    return replace(result, node=ray.get_runtime_context().get_node_id(),
                   host=ray.util.get_node_ip_address())


@contextlib.contextmanager
def connected(address: str | None) -> Iterator[ModuleType]:
    """Ray, connected: to the cluster this process is already connected to, else to ``address``
    (or ``RAY_ADDRESS``), else to a cluster started on this machine for the run and shut down
    after it."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    own = address is None and not os.environ.get("RAY_ADDRESS")
    if own:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    handler = signal.getsignal(signal.SIGTERM)  # ray.init installs its own
    try:
        ray.init(address=address, **({"include_dashboard": False} if own else {}))
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = address or os.environ.get("RAY_ADDRESS") or "this machine"
        raise StreamMergeError(f"cannot connect to the Ray cluster at {where}: {_first_line(e)}; "
                               "check --ray-address (ray start --head prints it)") from None
    finally:
        signal.signal(signal.SIGTERM, handler)
    try:
        yield ray
    finally:
        ray.shutdown()


def task_groups(shards: int, per_task: int) -> list[tuple[int, ...]]:
    """Consecutive shard indices, ``per_task`` to a task."""
    return [tuple(range(k, min(k + per_task, shards))) for k in range(0, shards, per_task)]


def merge_on_ray(sched: Schedule, staged: StagingDirectory, quiet: bool,
                 journal: Journal) -> list[TaskResult]:
    """Merge every shard of ``sched`` into ``staged`` on Ray; the tasks' results, in shard order."""
    plan = sched.plan
    remove_stale_downloads(sched, staged)
    with connected(plan.ray_address) as ray:
        gpus = 1 if sched.device.is_cuda else 0  # a task sees no GPU that Ray did not assign it
        if gpus and not ray.cluster_resources().get("GPU"):
            raise StreamMergeError("device: cuda, but the Ray cluster has no GPU (its nodes were "
                                   "started without one); use --device cpu, or add GPU nodes")
        remote = ray.remote(_run_on_node).options(num_cpus=CPUS_PER_TASK, num_gpus=gpus,
                                                  max_retries=MAX_RETRIES, scheduling_strategy="SPREAD")
        groups = task_groups(len(sched.shards), plan.shards_per_task)
        refs = {remote.remote(ShardTask(plan, str(staged.staging), g, journal.identity, CPUS_PER_TASK)): g
                for g in groups}
        results: dict[tuple[int, ...], TaskResult] = {}
        pending = list(refs)
        try:
            with tqdm(total=sched.write_bytes, unit="B", unit_scale=True, unit_divisor=1024, disable=quiet,
                      desc=f"merging: {len(groups)} Ray tasks", dynamic_ncols=True) as bar:
                while pending:
                    ready, pending = ray.wait(pending, num_returns=1, timeout=WAIT_SECONDS)
                    for ref in ready:
                        group = refs[ref]
                        try:
                            results[group] = result = ray.get(ref)
                        except Exception as e:  # the task failed for good: its shard and why
                            why = _task_error(ray, e)
                            raise StreamMergeError(f"{_shards(sched, group)}: {why}") from None
                        bar.update(result.bytes_written)
        finally:
            _stop(ray, pending)
    return [results[g] for g in groups]


def _stop(ray: ModuleType, pending: list) -> None:
    """Cancel the tasks still running and wait (boundedly) until they are gone: the staging
    directory is unlocked after this, for a rerun to resume."""
    if not pending:
        return
    for ref in pending:
        ray.cancel(ref, force=True)
    deadline = time.monotonic() + CANCEL_WAIT_SECONDS
    while pending and time.monotonic() < deadline:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=deadline - time.monotonic())


def _shards(sched: Schedule, group: tuple[int, ...]) -> str:
    names = [sched.shards[k].filename for k in group]
    return f"shard {names[0]}" if len(names) == 1 else f"shards {names[0]} to {names[-1]}"


def _task_error(ray: ModuleType, e: Exception) -> str:
    if isinstance(e, ray.exceptions.RayTaskError):
        cause = e.cause
        if isinstance(cause, StreamMergeError):
            return str(cause)
        return f"{type(cause).__name__}: {_first_line(cause)}"
    if isinstance(e, (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError)):
        return f"its worker died {MAX_RETRIES + 1} times ({type(e).__name__}); see the Ray logs of its node"
    return f"{type(e).__name__}: {_first_line(e)}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
