"""The Python API; the CLI is a thin layer over it."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

from streammerge.engine import MergeResult, run_schedule
from streammerge.errors import OutputError, PlanError
from streammerge.finalize import write_model_files
from streammerge.io.writer import StagedOutput
from streammerge.lora.output import write_adapter
from streammerge.plan import MergePlan, load_plan
from streammerge.plan.load import PlanWarning, read_documents
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
    if isinstance(plan, (str, Path)):
        documents = read_documents(Path(plan))
        if len(documents) > 1:
            return _merge_stages(Path(plan), documents, output, overwrite=overwrite, quiet=quiet, strict=strict,
                                 cache_dir=cache_dir, **overrides)
    return _merge_one(load_plan(plan, strict, cache_dir), output, overwrite, quiet, overrides)


def _merge_one(resolved: MergePlan, output: str | Path | None, overwrite: bool, quiet: bool, overrides: dict[str, Any]) -> MergeResult:
    from streammerge import __version__

    started = time.perf_counter()
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
            if resolved.adapter_output is not None:
                write_adapter(sched, staged, __version__)
            else:
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


def _merge_stages(path: Path, documents: list[Any], output: str | Path | None, *, overwrite: bool, quiet: bool,
                  strict: bool | None, cache_dir: str | None, **overrides: Any) -> MergeResult:
    """A mergekit-multi file: documents merged in order; every one but the last has a ``name:``
    that later documents use as a model, and is written to ``<OUT>-stages/<name>``. A stage whose
    output already exists (outputs appear only complete) is not merged again; delete it to redo it."""
    last = documents[-1] if isinstance(documents[-1], dict) else {}
    final = output if output is not None else last.get("output")
    if final is None:
        raise PlanError(f"{path}: no output directory: give one (streammerge run PLAN OUT) or set 'output:' in the last document")
    final = Path(final).expanduser().absolute()
    stages: dict[str, str] = {}
    result = None
    for k, doc in enumerate(documents):
        where = f"{path} (document {k + 1})"
        if not isinstance(doc, dict):
            raise PlanError(f"{where}: a plan is a YAML mapping with at least 'merge_method' and 'models' or 'slices'")
        doc = dict(doc)
        name = doc.pop("name", None)
        is_last = k == len(documents) - 1
        if not is_last and not isinstance(name, str):
            raise PlanError(f"{where}: every document but the last needs a 'name:' for later ones to refer to")
        doc = _with_stage_outputs(doc, stages)
        out = final if is_last else final.parent / f"{final.name}-stages" / name
        if not is_last and (out / "config.json").is_file():
            if not quiet:
                warnings.warn(f"{where}: stage {name!r} is already merged in {out}; skipping it", PlanWarning, stacklevel=2)
        else:
            result = _merge_one(load_plan(doc, strict, cache_dir, root=path.parent, where=where), out, overwrite, quiet, overrides)
        if name is not None:
            stages[name] = str(out)
    assert result is not None
    return result


def _with_stage_outputs(doc: dict, stages: dict[str, str]) -> dict:
    """``doc`` with model references that name an earlier stage replaced by its output directory."""
    def swap(ref: Any) -> Any:
        return stages.get(ref, ref) if isinstance(ref, str) else ref

    def entries(items: Any) -> Any:
        return [{**e, "model": swap(e.get("model"))} if isinstance(e, dict) else e for e in items] if isinstance(items, list) else items

    doc = {**doc, "models": entries(doc["models"])} if "models" in doc else doc
    if isinstance(doc.get("slices"), list):
        doc["slices"] = [{**s, "sources": entries(s.get("sources")), **({"base_model": swap(s["base_model"])} if "base_model" in s else {})}
                         if isinstance(s, dict) else s for s in doc["slices"]]
    for key in ("base_model", "tokenizer_source"):
        if key in doc:
            doc[key] = swap(doc[key])
    return doc
