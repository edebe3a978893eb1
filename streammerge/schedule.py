"""The schedule: every output tensor, its inputs, parameters, dtypes, chunking and place on disk.

Built from the plan and the checkpoints' headers alone (no tensor data is read), so everything
that can be checked without data (key sets, shapes, dtypes, parameters) fails here, before any
output exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import torch

from streammerge.errors import PlanError
from streammerge.io.reader import Checkpoint
from streammerge.io.safetensors_format import build_header
from streammerge.methods import MergeMethod, TensorParams, get_method
from streammerge.plan.parameters import evaluate, gradient_position, layer_index
from streammerge.plan.schema import MergePlan, ModelEntry

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}
DEFAULT_WORKING_BYTES = 256 << 20  # chunk working set when the plan sets no memory budget
MIN_WORKING_BYTES = 16 << 20


@dataclass(frozen=True)
class TensorJob:
    """One output tensor. ``inputs`` index ``Schedule.checkpoints``; with ``has_base`` the first is
    the base. A job with ``method`` None copies ``inputs[0]`` unchanged (non-float tensors)."""

    name: str
    shape: tuple[int, ...]
    method: MergeMethod | None
    inputs: tuple[int, ...]
    has_base: bool
    model_ids: tuple[int, ...]
    params: TensorParams
    load_dtype: torch.dtype
    compute_dtype: torch.dtype
    out_dtype: torch.dtype
    rows_per_chunk: int
    shard: int
    offset: int

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def out_bytes(self) -> int:
        return math.prod(self.shape) * self.out_dtype.itemsize


@dataclass(frozen=True)
class Shard:
    filename: str
    header: bytes
    size: int
    tensors: tuple[str, ...]


@dataclass(frozen=True)
class Schedule:
    plan: MergePlan
    checkpoints: tuple[Checkpoint, ...]
    jobs: tuple[TensorJob, ...]
    shards: tuple[Shard, ...]
    reference: int
    read_bytes: int
    notes: tuple[str, ...]
    baseline_rss: int
    peak_working_bytes: int

    @property
    def write_bytes(self) -> int:
        return sum(s.size for s in self.shards)

    @property
    def predicted_peak_rss(self) -> int:
        return self.baseline_rss + self.peak_working_bytes

    def close(self) -> None:
        for c in self.checkpoints:
            c.close()


def build_schedule(plan: MergePlan) -> Schedule:
    method = get_method(plan.merge_method)
    paths = list(dict.fromkeys(([plan.base_model] if plan.base_model else []) + [m.model for m in plan.models]))
    checkpoints = tuple(Checkpoint(p) for p in paths)
    try:
        return _build(plan, method, checkpoints, paths)
    except BaseException:
        for c in checkpoints:
            c.close()
        raise


def _build(plan: MergePlan, method: MergeMethod, checkpoints: tuple[Checkpoint, ...], paths: list[str]) -> Schedule:
    index = {p: i for i, p in enumerate(paths)}
    uses_base = method.base == "required" or (method.base == "optional" and plan.base_model is not None)
    if method.base == "required" and plan.base_model is None:
        raise PlanError(f"base_model: {method.name} needs a base_model")
    entries = list(enumerate(plan.models))
    if uses_base:  # the base is the method's own input, not one of the merged models
        entries = [(i, m) for i, m in entries if m.model != plan.base_model]
    elif plan.base_model is not None and plan.base_model not in {m.model for m in plan.models}:
        entries.append((len(plan.models), ModelEntry(model=plan.base_model)))  # mergekit adds the base as a model
    given = len(entries) + uses_base
    if method.models_exactly is not None and given != method.models_exactly:
        counted = " including base_model" if uses_base else ""
        raise PlanError(f"models: {method.name} merges exactly {method.models_exactly} models{counted}, got {given}")
    if len(entries) < method.min_models:
        counted = " besides base_model" if uses_base else ""
        raise PlanError(f"models: {method.name} needs at least {method.min_models} model(s){counted}, got {len(entries)}")
    inputs = ([index[plan.base_model]] if uses_base else []) + [index[m.model] for _, m in entries]
    reference = index[plan.base_model] if plan.base_model else inputs[0]
    ref = checkpoints[reference]
    config = ref.config()
    num_layers = int(config.get("num_hidden_layers") or 1 + max((layer_index(n) or 0) for n in ref.tensors))

    notes = _check_key_sets(checkpoints, inputs, reference)
    specs = [(e.model, e.parameters) for _, e in entries]
    model_ids = tuple(i for i, _ in entries)
    budget = _working_budget(plan)
    jobs = []
    for name in sorted(ref.tensors, key=lambda n: (str(ref.file_of(n)), ref.offset_of(n))):  # read order
        info = ref.tensors[name]
        for i in inputs:
            other = checkpoints[i].tensors[name]
            if other.shape != info.shape:
                raise PlanError(f"tensor {name!r}: shape {list(other.shape)} in {checkpoints[i].path} does not match {list(info.shape)} in {ref.path}")
        if info.dtype.is_floating_point:
            load = DTYPES[plan.dtype] if plan.dtype else info.dtype
            params = _resolve_params(method, plan, specs, name, gradient_position(name, num_layers))
            job = TensorJob(name, info.shape, method, tuple(inputs), uses_base, model_ids, params, load,
                            _compute_dtype(plan, method, load), DTYPES[plan.out_dtype] if plan.out_dtype else load, 0, 0, 0)
        else:
            job = TensorJob(name, info.shape, None, (reference,), False, (), TensorParams({}, ()), info.dtype, info.dtype, info.dtype, 0, 0, 0)
        per_elem = _bytes_per_element(checkpoints, job)
        jobs.append(replace(job, rows_per_chunk=_rows_per_chunk(plan, job, per_elem, budget)))
    copied = sum(j.method is None for j in jobs)
    if copied:
        notes.append(f"{copied} non-float tensors copied unchanged from {ref.path}")
    shards, jobs = _place(jobs, plan.shard_size)
    peak = max(j.rows_per_chunk * (math.prod(j.shape) // j.rows) * _bytes_per_element(checkpoints, j) for j in jobs)
    read_bytes = sum(math.prod(j.shape) * checkpoints[i].tensors[j.name].dtype.itemsize for j in jobs for i in j.inputs)
    return Schedule(plan, checkpoints, tuple(jobs), shards, reference, read_bytes, tuple(notes),
                    psutil.Process().memory_info().rss, peak)


def _check_key_sets(checkpoints: tuple[Checkpoint, ...], inputs: list[int], reference: int) -> list[str]:
    ref = checkpoints[reference]
    notes = []
    for i in inputs:
        missing = [n for n in ref.tensors if n not in checkpoints[i].tensors]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise PlanError(f"tensor {missing[0]!r}{more} missing from {checkpoints[i].path} (present in {ref.path})")
        extra = [n for n in checkpoints[i].tensors if n not in ref.tensors]
        if extra:
            notes.append(f"{len(extra)} tensors of {checkpoints[i].path} absent from {ref.path} are not merged (e.g. {extra[0]!r})")
    return notes


def _resolve_params(method: MergeMethod, plan: MergePlan, specs: list[tuple[str, dict]], tensor: str, t: float) -> TensorParams:
    def value(spec: Any, own: dict | None) -> Any:
        for source in (own, plan.parameters):
            if source is not None and spec.name in source:
                v = evaluate(source[spec.name], tensor, t)
                if v is not None:
                    return v
        return spec.default

    globals_ = {}
    for spec in method.params:
        if not spec.per_model:
            globals_[spec.name] = value(spec, None)
            if globals_[spec.name] is None and spec.required:
                raise PlanError(f"parameters.{spec.name}: {method.name} needs {spec.name!r} (for tensor {tensor!r})")
    models = []
    for model, own in specs:
        per = {}
        for spec in method.params:
            if spec.per_model:
                per[spec.name] = value(spec, own)
                if per[spec.name] is None and spec.required:
                    raise PlanError(f"models: {method.name} needs parameter {spec.name!r} for model {model} (tensor {tensor!r})")
        models.append(per)
    return TensorParams(globals_, tuple(models))


def _compute_dtype(plan: MergePlan, method: MergeMethod, load: torch.dtype) -> torch.dtype:
    if plan.compute_dtype != "auto":
        return DTYPES[plan.compute_dtype]
    if method.precision == "load":
        return load
    return torch.float64 if load == torch.float64 else torch.float32


def _bytes_per_element(checkpoints: tuple[Checkpoint, ...], job: TensorJob) -> int:
    """Working bytes per element of a chunk: the raw inputs, their compute-dtype copies, and the
    method's temporaries (deltas, a stacked copy, masks and the output: about n + 4 more)."""
    raw = sum(checkpoints[i].tensors[job.name].dtype.itemsize for i in job.inputs)
    return raw + (2 * len(job.inputs) + 4) * job.compute_dtype.itemsize


def _working_budget(plan: MergePlan) -> int:
    if plan.max_memory is None:
        return DEFAULT_WORKING_BYTES
    baseline = psutil.Process().memory_info().rss
    return max(MIN_WORKING_BYTES, plan.max_memory - baseline)


def _rows_per_chunk(plan: MergePlan, job: TensorJob, per_elem: int, budget: int) -> int:
    row_numel = math.prod(job.shape) // job.rows if job.rows else 0
    if row_numel == 0:
        return max(job.rows, 1)
    if plan.chunk_size is not None:
        return max(1, min(job.rows, plan.chunk_size // row_numel))
    return max(1, min(job.rows, budget // (row_numel * per_elem)))


def _place(jobs: list[TensorJob], shard_size: int) -> tuple[tuple[Shard, ...], list[TensorJob]]:
    """Assign shards greedily in schedule order (a new shard starts when the next tensor would
    overflow this one) and give every job its absolute offset in its shard."""
    groups: list[list[TensorJob]] = [[]]
    size = 0
    for job in jobs:
        if groups[-1] and size + job.out_bytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(job)
        size += job.out_bytes
    shards, placed = [], []
    for k, group in enumerate(groups):
        header, offsets = build_header([(j.name, j.out_dtype, j.shape) for j in group], {"format": "pt"})
        shards.append(Shard(_shard_name(k, len(groups)), header, len(header) + sum(j.out_bytes for j in group), tuple(j.name for j in group)))
        placed += [replace(j, shard=k, offset=offsets[j.name]) for j in group]
    return tuple(shards), placed


def _shard_name(k: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def describe(schedule: Schedule) -> str:
    """The human summary that ``streammerge plan`` prints."""
    gib = lambda b: f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"  # noqa: E731
    plan = schedule.plan
    merged = sum(j.method is not None for j in schedule.jobs)
    chunked = sum(j.rows_per_chunk < j.rows for j in schedule.jobs)
    lines = [
        f"method        {plan.merge_method}",
        f"inputs        {len(schedule.checkpoints)} checkpoints" + (f" (base: {plan.base_model})" if plan.base_model else ""),
        f"tensors       {len(schedule.jobs)} ({merged} merged, {len(schedule.jobs) - merged} copied; {chunked} in several chunks)",
        f"shards        {len(schedule.shards)}: " + ", ".join(s.filename for s in schedule.shards[:3]) + (" ..." if len(schedule.shards) > 3 else ""),
        f"read          {gib(schedule.read_bytes)}",
        f"write         {gib(schedule.write_bytes)}",
        f"peak memory   {gib(schedule.predicted_peak_rss)} predicted ({gib(schedule.baseline_rss)} process + {gib(schedule.peak_working_bytes)} largest chunk working set)",
    ]
    dts = sorted({(str(j.compute_dtype), str(j.out_dtype)) for j in schedule.jobs if j.method is not None})
    lines.append("dtypes        " + ", ".join(f"compute {c.removeprefix('torch.')} -> write {o.removeprefix('torch.')}" for c, o in dts))
    lines += [f"note          {n}" for n in schedule.notes]
    return "\n".join(lines)
