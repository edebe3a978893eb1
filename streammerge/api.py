"""The Python API; the CLI is a thin layer over it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from streammerge.engine import MergeResult, run_schedule
from streammerge.errors import OutputError, PlanError
from streammerge.finalize import write_model_files
from streammerge.io.writer import StagedOutput
from streammerge.plan import MergePlan, load_plan
from streammerge.schedule import Schedule, build_schedule


def _with_overrides(plan: MergePlan, overrides: dict[str, Any]) -> MergePlan:
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if not overrides:
        return plan
    return load_plan(MergePlan.model_validate({**plan.model_dump(), **overrides}))


def schedule(plan: str | Path | dict | MergePlan, *, strict: bool | None = None, cache_dir: str | None = None,
             **overrides: Any) -> Schedule:
    """Build the schedule for a plan (headers only). Close it with ``Schedule.close()``."""
    return build_schedule(_with_overrides(load_plan(plan, strict, cache_dir), overrides))


def merge(plan: str | Path | dict | MergePlan, output: str | Path | None = None, *, overwrite: bool = False,
          quiet: bool = False, strict: bool | None = None, cache_dir: str | None = None, **overrides: Any) -> MergeResult:
    """Merge as ``plan`` says into ``output`` (or the plan's ``output``) and return a summary.

    ``overrides`` replace native plan keys: ``shard_size``, ``max_memory``, ``chunk_size``,
    ``compute_dtype``, ``seed``. ``strict``: unknown keys are errors rather than warnings
    (default: strict for native plans, lenient for mergekit configs). ``cache_dir``: where models
    named ``org/name[@revision]`` are fetched from the Hub (default: huggingface_hub's cache).
    """
    from streammerge import __version__

    started = time.perf_counter()
    resolved = load_plan(plan, strict, cache_dir)
    destination = output if output is not None else resolved.output
    if destination is None:
        raise PlanError("no output directory: give one (streammerge run PLAN OUT, or -o OUT) or set 'output:' in the plan")
    destination = Path(destination).expanduser().absolute()
    sched = build_schedule(_with_overrides(resolved, {**overrides, "output": str(destination)}))
    try:
        for c in sched.checkpoints:
            if destination == c.path.resolve() or c.path.resolve() in destination.parents:
                raise OutputError(f"{destination}: the output may not be an input model directory or inside one ({c.path})")
        staged = StagedOutput(destination, overwrite)
        try:
            run_schedule(sched, staged, quiet)
            write_model_files(sched, staged, __version__)
            staged.commit()
        except BaseException:
            staged.discard()
            raise
        return MergeResult(destination, len(sched.jobs), len(sched.shards), sched.read_bytes, sched.write_bytes,
                           time.perf_counter() - started, sched.notes)
    finally:
        sched.close()
