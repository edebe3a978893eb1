"""The Python API; the CLI is a thin layer over it."""

from __future__ import annotations

import errno
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pydantic

from streammerge.engine import MergeResult, RunReport
from streammerge.errors import OutputError, PlanError, StreamMergeError
from streammerge.executors.local import merge_weights
from streammerge.executors.ray_executor import merge_on_ray
from streammerge.finalize import write_model_files
from streammerge.io.layout import INDEX
from streammerge.io.writer import StagedOutput
from streammerge.journal import Journal, discard_journals
from streammerge.lora.output import write_adapter
from streammerge.plan import MergePlan, load_plan
from streammerge.plan.load import PlanWarning, describe_error, read_documents
from streammerge.record import write_record
from streammerge.schedule import Schedule, build_schedule, input_models


def _with_overrides(plan: MergePlan, overrides: dict[str, Any]) -> MergePlan:
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if not overrides:
        return plan
    try:
        merged = MergePlan.model_validate({**plan.model_dump(), **overrides})
    except pydantic.ValidationError as e:  # an option that contradicts the plan or another option
        raise PlanError(f"the plan with its options: {describe_error(e)}") from None
    return load_plan(merged)


def schedule(plan: str | Path | dict | MergePlan, *, strict: bool | None = None, cache_dir: str | None = None,
             **overrides: Any) -> Schedule:
    """Build the schedule for a plan (headers only). Close it with ``Schedule.close()``. A
    ``merge_config:`` file or dict gets its translation's notes first."""
    from streammerge.frontdoors.model_merger import ModelMerger, config_of

    config = config_of(plan)
    if config is None:
        return build_schedule(_with_overrides(load_plan(plan, strict, cache_dir), overrides))
    resolved, translation = ModelMerger(config).plan(strict, cache_dir)
    sched = build_schedule(_with_overrides(resolved, overrides))
    return replace(sched, notes=(*translation.notes, *sched.notes))


def merge(plan: str | Path | dict | MergePlan, output: str | Path | None = None, *, overwrite: bool = False,
          restart: bool = False, quiet: bool = False, strict: bool | None = None, cache_dir: str | None = None,
          **overrides: Any) -> MergeResult:
    """Merge as ``plan`` says into ``output`` (or the plan's ``output``) and return a summary.
    A ``merge_config:`` file or dict (``streammerge.frontdoors.model_merger``) runs as its tool
    runs it, into ``output`` or its ``output_path``.

    A merge that was killed or failed left its partial output in a staging directory beside
    ``output``; running it again resumes from there (``restart`` discards it and starts over).
    ``overrides`` replace native plan keys: ``shard_size``, ``max_memory``, ``chunk_size``,
    ``compute_dtype``, ``seed``, ``allow_nonfinite``, ``device`` (cpu, cuda, auto), ``max_gpu_memory``,
    ``vocab_policy``, ``allow_crimes``, ``copy_tokenizer``, ``write_model_card``. ``strict``: unknown
    keys are errors rather than warnings
    (default: strict for native plans, lenient for mergekit configs). ``cache_dir``: where models
    named ``org/name[@revision]`` are fetched from the Hub (default: huggingface_hub's cache).
    """
    from streammerge.frontdoors.model_merger import ModelMerger, config_of

    config = config_of(plan)
    if config is not None:
        return ModelMerger(config).merge(output, overwrite=overwrite, restart=restart, quiet=quiet,
                                         strict=strict, cache_dir=cache_dir, **overrides)
    if isinstance(plan, (str, Path)):
        documents = read_documents(Path(plan))
        if len(documents) > 1:
            return _merge_stages(Path(plan), documents, output, overwrite=overwrite, restart=restart, quiet=quiet,
                                 strict=strict, cache_dir=cache_dir, **overrides)
    return _merge_one(load_plan(plan, strict, cache_dir), output, overwrite, restart, quiet, overrides)


def _check_output_place(destination: Path, sched: Schedule) -> None:
    for c in sched.checkpoints:
        model = c.path.resolve()
        if destination == model or model in destination.parents:
            raise OutputError(f"{destination}: the output may not be an input model directory or inside one ({c.path})")
        if destination in model.parents:
            raise OutputError(f"{destination}: the output may not contain an input model ({c.path}); choose another directory")


def _merge_one(resolved: MergePlan, output: str | Path | None, overwrite: bool, restart: bool, quiet: bool,
               overrides: dict[str, Any]) -> MergeResult:
    from streammerge import __version__
    from streammerge.verify import MANIFEST, holds_merge, manifest

    started = time.perf_counter()
    destination = output if output is not None else resolved.output
    if destination is None:
        raise PlanError("no output directory: give one (streammerge run PLAN OUT, or -o OUT) or set 'output:' in the plan")
    destination = Path(destination).expanduser().absolute()
    sched = build_schedule(_with_overrides(resolved, {**overrides, "output": str(destination)}))
    try:
        _check_output_place(destination.resolve(), sched)
        if not overwrite and destination.is_dir() and holds_merge(destination, sched):
            return MergeResult(destination, len(sched.jobs), len(sched.shards), 0, 0, time.perf_counter() - started, 0.0,
                               sched.notes, sched.device.description, up_to_date=True,
                               inputs=tuple(input_models(resolved)))
        staged = StagedOutput(destination, overwrite, restart)
        on_ray = sched.plan.executor == "ray"
        # On Ray each task checks the tensors already written to its shards, not the driver.
        journal = _open_journal(staged, sched.of_shards(()) if on_ray else sched)
        resumed = len(journal.entries)
        report, downloading, merging, tasks = RunReport(0.0, (), None), 0.0, 0.0, []
        try:
            if resolved.adapter_output is not None:
                write_adapter(sched, staged, __version__)
            else:
                if on_ray:
                    tasks = merge_on_ray(sched, staged, quiet, journal)
                    entries = {name: e for t in tasks for name, e in t.entries.items()}
                    report = RunReport(0.0, tuple(n for t in tasks for n in t.notes), None)
                    resumed = sum(t.resumed for t in tasks)
                else:
                    report, downloading, merging = merge_weights(sched, staged, quiet, journal)
                    entries = journal.entries
                write_model_files(sched, staged, __version__)
                staged.write_json(MANIFEST, manifest(sched, entries, journal.identity))
            write_record(sched, staged, __version__)
        except StreamMergeError as e:
            raise type(e)(f"{e}{_kept(staged)}") from None
        except OSError as e:
            raise OutputError(f"{e.filename or staged.staging}: {_os_problem(e)}{_kept(staged)}") from None
        finally:
            journal.close()
        discard_journals(staged.staging)
        committed = time.perf_counter()
        staged.commit()
        sync = report.sync_seconds + time.perf_counter() - committed
        notes = sched.notes + report.notes + ((f"resumed: {resumed} of {len(sched.jobs)} tensors were already written",) if resumed else ())
        return MergeResult(destination, len(sched.jobs), len(sched.shards), sched.read_bytes, sched.write_bytes,
                           time.perf_counter() - started, sync, notes, sched.device.description,
                           report.peak_gpu_bytes, inputs=tuple(input_models(resolved)),
                           download_seconds=downloading, merge_seconds=merging, tasks=tuple(tasks))
    finally:
        sched.close()


def _open_journal(staged: StagedOutput, sched: Schedule) -> Journal:
    try:
        return Journal(staged.staging, sched)
    except OSError as e:
        raise OutputError(f"{e.filename or staged.staging}: {_os_problem(e)}") from None


def _os_problem(e: OSError) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full while writing ({e.strerror}); free space and run again"
    return f"cannot write ({e.strerror})"


def _kept(staged: StagedOutput) -> str:
    return (f" (the partial output is kept in {staged.staging}: the same command resumes it, "
            "--restart discards it)")


@dataclass(frozen=True)
class Stage:
    """One document of a multi-document plan file, and where its output goes."""

    number: int  # its place in the file, from 1
    document: dict  # without its 'name'
    name: str | None  # later documents name it as a model
    output: Path
    reuse: bool  # an existing model at ``output`` is kept, not merged again


def merge_stages(path: Path, stages: list[Stage], *, overwrite: bool = False, restart: bool = False,
                 quiet: bool = False, strict: bool | None = None, cache_dir: str | None = None,
                 **overrides: Any) -> list[MergeResult | None]:
    """Merge ``stages`` in order (a stage's inputs come first); references to an earlier stage's
    name become its output directory. One result per stage, None for a reused one."""
    outputs: dict[str, str] = {}
    results: list[MergeResult | None] = []
    for stage in stages:
        where = f"{path} (document {stage.number})"
        if stage.reuse and _holds_model(stage.output):
            if not quiet:
                what = "the final merge" if stage.name is None else f"stage {stage.name!r}"
                warnings.warn(f"{where}: {what} is already merged in {stage.output}; skipping it",
                              PlanWarning, stacklevel=2)
            results.append(None)
        else:
            doc = with_stage_outputs(stage.document, outputs)
            plan = load_plan(doc, strict, cache_dir, root=path.parent, where=where)
            results.append(_merge_one(plan, stage.output, overwrite, restart, quiet, overrides))
        if stage.name is not None:
            outputs[stage.name] = str(stage.output)
    return results


_WEIGHTS = ("model.safetensors", INDEX, "pytorch_model.bin", "pytorch_model.bin.index.json")


def _holds_model(path: Path) -> bool:
    """Whether ``path`` holds a model: config.json and weights (an output appears only complete)."""
    return (path / "config.json").is_file() and any((path / f).is_file() for f in _WEIGHTS)


def _merge_stages(path: Path, documents: list[Any], output: str | Path | None, **options: Any) -> MergeResult:
    """A mergekit-multi file run by ``streammerge run``: documents merged in order; every one but
    the last has a ``name:`` that later documents use as a model, and is written to
    ``<OUT>-stages/<name>``. A stage whose output already exists is not merged again; delete it to redo it."""
    last = documents[-1] if isinstance(documents[-1], dict) else {}
    final = output if output is not None else last.get("output")
    if final is None:
        raise PlanError(f"{path}: no output directory: give one (streammerge run PLAN OUT) or set 'output:' in the last document")
    final = Path(final).expanduser().absolute()
    stages = []
    for k, doc in enumerate(documents):
        where = f"{path} (document {k + 1})"
        if not isinstance(doc, dict):
            raise PlanError(f"{where}: a plan is a YAML mapping with at least 'merge_method' and 'models' or 'slices'")
        doc = dict(doc)
        name = doc.pop("name", None)
        is_last = k == len(documents) - 1
        if not is_last and not isinstance(name, str):
            raise PlanError(f"{where}: every document but the last needs a 'name:' for later ones to refer to")
        out = final if is_last else final.parent / f"{final.name}-stages" / name
        stages.append(Stage(k + 1, doc, name, out, reuse=not is_last))
    result = merge_stages(path, stages, **options)[-1]
    assert result is not None
    return result


def with_stage_outputs(doc: dict, stages: dict[str, str]) -> dict:
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
