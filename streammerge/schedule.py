"""The schedule: every output tensor, its inputs, parameters, dtypes, chunking and place on disk.

Built from the plan and the checkpoints' headers alone (no tensor data is read), so everything
that can be checked without data (key sets, shapes, dtypes, parameters) fails here, before any
output exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Collection, Iterable

import psutil
import torch

from streammerge.device import CPU, Device, device_budget, resolve_device
from streammerge.errors import PlanError
from streammerge.io.reader import Checkpoint
from streammerge.io.rows import RowMap
from streammerge.io.safetensors_format import build_header
from streammerge.lora.overlay import open_checkpoints
from streammerge.methods import MergeMethod, Param, TensorParams, get_method
from streammerge.plan.architecture import (TIED_HEADS, architecture_modules, filter_name, is_pre_layer,
                                           is_vocab_tensor, layer_index, module_fragments, tied_partner,
                                           with_layer)
from streammerge.plan.crimes import check_architectures
from streammerge.plan.parameters import evaluate, gradient_position, typed
from streammerge.plan.schema import MergePlan, Module
from streammerge.sources.budget import describe_budget, download_limit
from streammerge.sources.downloads import hub_downloads
from streammerge.statistics import WEIGHT_SHAPED, ModelStatistics, attach
from streammerge.tokenizer.chat_template import resolve_chat_template
from streammerge.tokenizer.embeddings import row_maps
from streammerge.tokenizer.special import special_tokens
from streammerge.tokenizer.vocab import Vocabulary, _load, build_vocabulary
from streammerge.workers import in_flight

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}
DEFAULT_WORKING_BYTES = 128 << 20  # chunk working set when the plan sets no memory budget
MIN_WORKING_BYTES = 16 << 20
ALLOCATOR_SLACK = 0.25  # share of a GPU memory budget kept free of planned chunks
HEAP_SLACK = 0.5  # the same for host memory: two workers' freed chunks fragment glibc's heap more
READ_AHEAD_CHUNKS = 4  # chunks the engine's reader thread holds ready beyond those being merged (a pass starts with a burst)
SPLIT_ELEMENTS = 1 << 20  # on several CPU workers, tensors at least this large are cut into a chunk per worker or more
VocabRows = tuple[tuple[int, str], ...]  # a vocabulary matrix's (row count, model path) per input
# Room a suggested max_memory leaves for the process's size (0.2 MiB apart over 9 fresh runs).
RSS_VARIATION = 1 << 20


@dataclass(frozen=True)
class Source:
    """One input of an output tensor: a tensor of one checkpoint (``Schedule.checkpoints`` index)."""

    checkpoint: int
    tensor: str
    rows: int | None = None  # rows this input has, when fewer than the output's (the rest come from inputs[0])
    row_map: RowMap | None = None  # embedding rows re-indexed to the output vocabulary


@dataclass(frozen=True)
class TensorJob:
    """One output tensor. With ``has_base`` the first input is the base. A job with ``method``
    None copies ``inputs[0]``, rounded to ``load_dtype`` then to ``out_dtype``."""

    name: str
    shape: tuple[int, ...]
    method: MergeMethod | None
    inputs: tuple[Source, ...]
    has_base: bool
    model_ids: tuple[int, ...]
    params: TensorParams
    load_dtype: torch.dtype
    compute_dtype: torch.dtype
    out_dtype: torch.dtype
    rows_per_chunk: int = 0
    shard: int = 0
    offset: int = 0
    # kinds of calibration statistics its method reads (``streammerge.statistics``)
    statistics: tuple[str, ...] = ()
    # rows written as ``inputs[kept_from]`` holds them (copied, not merged): select.keep_tokens_from_base
    kept_rows: tuple[int, ...] = ()
    kept_from: int = 0

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def merged_inputs(self) -> tuple[Source, ...]:
        """The inputs of the merged models (the base excluded), in ``Chunk.models``'s order."""
        return self.inputs[1:] if self.has_base else self.inputs

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
    num_layers: int
    read_bytes: int
    notes: tuple[str, ...]
    baseline_rss: int
    peak_working_bytes: int
    vocabulary: Vocabulary | None = None  # the output tokenizer, when the plan builds one
    chat_template: str | None = None
    module_layers: tuple[tuple[str, int], ...] = ()  # modules: (config.json key, layer count) of each
    device: Device = CPU
    device_budget: int | None = None  # GPU bytes for working chunks (None on the CPU)
    workers: int = 1  # chunks merged at once, a thread each (``streammerge.workers``)
    statistics: tuple[ModelStatistics | None, ...] = ()  # per checkpoint: its calibration statistics, if read
    references: tuple[str, ...] = ()  # the plan's (resolved) model reference of each checkpoint

    @property
    def write_bytes(self) -> int:
        return sum(s.size for s in self.shards)

    @property
    def predicted_peak_rss(self) -> int:
        return self.baseline_rss + self.peak_working_bytes

    def of_shards(self, shards: Collection[int]) -> Schedule:
        """The part of this schedule that writes ``shards`` (indices): their jobs, every shard's
        layout kept (an executor's task writes its shards of the one output)."""
        jobs = tuple(j for j in self.jobs if j.shard in shards)
        return replace(self, jobs=jobs, read_bytes=_read_bytes(self.checkpoints, jobs))

    def close(self) -> None:
        for c in self.checkpoints:
            c.close()
        for st in self.statistics:
            if st is not None:
                st.close()


@dataclass(frozen=True)
class _Slice:
    """An output slice: its sources (model, layer range or None for all layers, own parameters)."""

    sources: tuple[tuple[str, range | None, dict], ...]
    base_model: str | None
    parameters: tuple[dict, ...]  # the slice's, then its module's
    adds_base: bool = False  # a `models:` list, to which mergekit adds a base_model it does not name


@dataclass(frozen=True)
class _Group:
    """The slices of one module (a plan without ``modules:`` is one module over every tensor)."""

    where: str  # the plan key, for messages: "models", "slices[{}]", "modules.NAME.models", ...
    prefix: str  # the module's tensor-name prefix
    layers_key: str | None  # config.json key of the module's layer count
    slices: list[_Slice]


def _slices(merge: MergePlan | Module, base_model: str | None) -> list[_Slice]:
    extra = (merge.parameters,) if isinstance(merge, Module) else ()
    if merge.models is not None:  # a `models:` config is one slice over every layer
        return [_Slice(tuple((m.model, None, m.parameters) for m in merge.models), base_model, ({}, *extra),
                       adds_base=True)]
    return [_Slice(tuple((src.model, range(*src.layer_range), src.parameters) for src in s.sources),
                   s.base_model or base_model, (s.parameters, *extra)) for s in merge.slices]


def _groups(plan: MergePlan, model_type: str | None) -> list[_Group]:
    """One group per module: ``modules:`` name the modules of the architecture, all of them."""
    if plan.modules is None:
        return [_Group("models" if plan.models is not None else "slices[{}]", "", None, _slices(plan, plan.base_model))]
    known = architecture_modules(model_type)
    unknown = [n for n in plan.modules if n not in known]
    missing = [n for n in known if n not in plan.modules]
    if unknown or missing:
        raise PlanError(f"modules: {model_type or 'this architecture'} has the modules {', '.join(known)}; "
                        + (f"{unknown[0]!r} is not one" if unknown else f"{missing[0]!r} is missing (every module is merged or copied explicitly)"))
    return [_Group(f"modules.{n}." + ("models" if m.models is not None else "slices[{}]"), known[n][0], known[n][1],
                   _slices(m, plan.base_model)) for n, m in plan.modules.items()]


def input_models(plan: MergePlan) -> list[str]:
    """Every model a plan reads (resolved references, each once): a slice's base, then its sources,
    then the donor when it is not merged."""
    merges = [plan] if plan.modules is None else list(plan.modules.values())
    slices = [s for m in merges for s in _slices(m, plan.base_model)]
    paths = list(dict.fromkeys(p for s in slices for p in ([s.base_model] if s.base_model else [])
                               + [m for m, _, _ in s.sources]))
    if plan.donor is not None and plan.donor not in paths:
        paths.append(plan.donor)  # read for what it lends only
    return paths


def build_schedule(plan: MergePlan) -> Schedule:
    method = get_method(plan.merge_method)
    device = resolve_device(plan.device)
    paths = input_models(plan)
    checkpoints = open_checkpoints(paths)  # `model+adapter` references fold the adapter in as they are read
    try:
        check_architectures(paths, [c.config() for c in checkpoints], plan.allow_crimes)
        groups = _groups(plan, checkpoints[0].config().get("model_type"))
        _check_recorded(plan, paths, checkpoints)
        built = replace(_build(plan, method, groups, tuple(checkpoints), paths, device),
                        references=tuple(paths))
        try:
            download_limit(built)  # too small a disk budget fails here, before a weight byte is fetched
        except BaseException:
            for st in built.statistics:
                if st is not None:
                    st.close()
            raise
        return built
    except BaseException:
        for c in checkpoints:
            c.close()
        raise


@dataclass(frozen=True)
class _SliceInputs:
    """A slice resolved for the method: inputs (base first when used), their layer ranges, own
    parameters and model ids."""

    checkpoints: tuple[int, ...]
    layers: tuple[range, ...]
    params: tuple[tuple[str, dict], ...]  # (model, own parameters) of the merged models, base excluded
    model_ids: tuple[int, ...]
    has_base: bool
    slice_params: tuple[dict, ...]
    donor: int  # position of the input that unmerged tensors are copied from: the base, else the first model
    base: int | None  # the base's checkpoint index, if the slice has one

    @property
    def base_only(self) -> bool:
        """Nothing besides the base to merge into it (a method with ``min_models`` 0): its tensors
        are the output, as mergekit's methods return the base when they have no task vector."""
        return self.has_base and not self.model_ids


def _slice_inputs(method: MergeMethod, s: _Slice, where: str, index: dict[str, int], ckpts: tuple[Checkpoint, ...],
                  prefix: str) -> _SliceInputs:
    uses_base = method.base == "required" or (method.base == "optional" and s.base_model is not None)
    if method.base == "required" and s.base_model is None:
        raise PlanError(f"base_model: {method.name} needs a base_model")
    entries = list(enumerate(s.sources))
    base_src = next(((m, r, p) for m, r, p in s.sources if m == s.base_model), None)
    if s.base_model is not None and base_src is None:
        if s.adds_base:  # mergekit adds the base to a `models:` list
            base_src = (s.base_model, s.sources[0][1], {})
        elif method.base != "model":
            # A slice's base must be a source (mergekit 0.1.5); linear and co. ignore it.
            raise PlanError(f"{where}: base_model {s.base_model} is not one of the slice's sources: "
                            f"add it, with the slice's layer_range, as mergekit 0.1.5 requires")
    if uses_base:  # the base is the method's own input, not one of the merged models
        entries = [(i, e) for i, e in entries if e[0] != s.base_model]
    elif base_src is not None and base_src not in s.sources:
        entries.append((len(s.sources), base_src))  # for linear and karcher the base is one more model
    given = len(entries) + uses_base
    if method.models_exactly is not None and given != method.models_exactly:
        counted = " including base_model" if uses_base else ""
        raise PlanError(f"{where}: {method.name} merges exactly {method.models_exactly} models{counted}, got {given}")
    counted = " besides base_model" if uses_base else ""
    if len(entries) < method.min_models:
        raise PlanError(f"{where}: {method.name} needs at least {method.min_models} model(s){counted}, got {len(entries)}")
    if method.max_models is not None and len(entries) > method.max_models:
        raise PlanError(f"{where}: {method.name} merges at most {method.max_models} models{counted}, got {len(entries)}")
    chosen = ([base_src] if uses_base else []) + [e for _, e in entries]
    layers = []
    for model, r, _ in chosen:
        n = 1 + max((li for t in ckpts[index[model]].tensors if t.startswith(prefix) and (li := layer_index(t[len(prefix):])) is not None),
                    default=-1)
        if r is not None and r.stop > n:
            raise PlanError(f"{where}: layer_range [{r.start}, {r.stop}) of {model}: the model has {n} layers (0-{n - 1})")
        layers.append(range(n) if r is None else r)
    if len({len(r) for r in layers}) > 1:
        raise PlanError(f"{where}: every source of a slice must span the same number of layers, got "
                        + ", ".join(f"{len(r)} ({m})" for r, (m, _, _) in zip(layers, chosen)))
    donor = next((k for k, (m, _, _) in enumerate(chosen) if m == s.base_model), 0)
    return _SliceInputs(tuple(index[m] for m, _, _ in chosen), tuple(layers), tuple((m, p) for _, (m, _, p) in entries),
                        tuple(i for i, _ in entries), uses_base, s.parameters, donor,
                        index[s.base_model] if s.base_model else None)


def _build(plan: MergePlan, method: MergeMethod, groups: list[_Group], checkpoints: tuple[Checkpoint, ...],
           paths: list[str], device: Device) -> Schedule:
    index = {p: i for i, p in enumerate(paths)}
    resolved = [_slice_inputs(method, s, groups[0].where.format(k), index, checkpoints, groups[0].prefix) for k, s in enumerate(groups[0].slices)]
    total_layers = sum(len(sl.layers[0]) for sl in resolved)
    if plan.select and plan.select.layers:
        bad = [li for li in plan.select.layers if not 0 <= li < total_layers]
        if bad:
            raise PlanError(f"select.layers: model has {total_layers} layers (0-{total_layers - 1}), got {bad[0]}")
    reference = resolved[0].checkpoints[0] if plan.donor is None else index[plan.donor]
    gpu = device_budget(device, plan.max_gpu_memory)  # first: it starts the CUDA context, part of the host baseline
    budget = working_budget(plan)
    gpu_budget = None if gpu is None else int(gpu * (1 - ALLOCATOR_SLACK))
    workers = 1 if device.is_cuda else torch.get_num_threads()  # a GPU runs one chunk's kernels at a time anyway
    model_type = checkpoints[reference].config().get("model_type")
    fragments = _module_fragments(plan, model_type)
    jobs: list[TensorJob] = []
    base_only: list[str] = []  # tensors of slices with no model besides the base
    notes: list[str] = []
    differing: list[tuple[str, VocabRows]] = []  # vocabulary matrices of differing row counts, to refuse
    spec = plan.tokenizer_spec
    vocab = None if spec is None else build_vocabulary(spec, checkpoints, index.get(plan.base_model, 0), plan.tokenizer is not None, notes)
    kept_rows = _kept_token_rows(plan, vocab, checkpoints[reference].path, notes)

    def add(prefix: str, name: str, sl: _SliceInputs, names: list[str], t: float) -> None:
        """Schedule output tensor ``prefix + name`` from ``prefix + names[i]`` of each input."""
        out_name = prefix + name
        sources = []
        for c, n in zip(sl.checkpoints, names):
            have = checkpoints[c].tensors
            partner = tied_partner(n, module_tensors(c, prefix))
            if prefix + n not in have and partner:
                notes.append(f"{checkpoints[c].path} ties {prefix + n} to its embeddings: using {prefix + partner} for it")
                n = partner
            n = prefix + n
            if n not in have:
                raise PlanError(f"tensor {n!r} missing from {checkpoints[c].path} (present in {checkpoints[sl.checkpoints[0]].path})")
            sources.append(Source(c, n))
        shapes = [checkpoints[s.checkpoint].tensors[s.tensor].shape for s in sources]
        if vocab is not None and is_vocab_tensor(out_name):
            shape = (vocab.rows, *_common_width(sources, shapes, checkpoints))
            maps = row_maps(vocab, spec.tokens, [(s.checkpoint, s.tensor) for s in sources], checkpoints, sl.base, notes)
            sources = [replace(s, row_map=m) for s, m in zip(sources, maps)]
        else:
            shape = _output_shape(plan, out_name, sources, shapes, checkpoints, notes, differing)
            sources = [replace(s, rows=sh[0]) if sh[0] < shape[0] else s for s, sh in zip(sources, shapes)]
        info = checkpoints[sources[0].checkpoint].tensors[sources[0].tensor]
        load = DTYPES[plan.dtype] if plan.dtype and info.dtype.is_floating_point else info.dtype
        out = DTYPES[plan.out_dtype] if plan.out_dtype and info.dtype.is_floating_point else load
        if info.dtype.is_floating_point and _selected(plan, fragments, out_name) and not sl.base_only:
            params = _resolve_params(method, plan, sl, out_name, filter_name(model_type, out_name), t)
            kept = tuple(r for r in kept_rows if r < shape[0]) if is_vocab_tensor(out_name) else ()
            job = TensorJob(out_name, shape, method, tuple(sources), sl.has_base, sl.model_ids, params, load,
                            _compute_dtype(plan, method, load), out, kept_rows=kept, kept_from=sl.donor)
        elif info.dtype.is_floating_point and sl.base_only:  # the base, rounded as a merge would round it
            rounded = load if plan.compute_dtype == "auto" else info.dtype
            job = TensorJob(out_name, shape, None, (sources[sl.donor],), False, (), TensorParams({}, ()),
                            rounded, rounded, out)
            base_only.append(out_name)
        else:  # copied unchanged from the donor (rounded to the output dtype)
            donor = sources[sl.donor] if plan.donor is None else lent(out_name, shape)
            job = TensorJob(out_name, shape, None, (donor,), False, (), TensorParams({}, ()), info.dtype, info.dtype, out)
        per_elem = bytes_per_element(checkpoints, job, workers)
        rows = chunk_rows(plan, job, per_elem, budget, workers)
        if gpu_budget is not None and job.method is not None:  # the same working set, on the GPU (host buffers stay within the host budget)
            rows = min(rows, chunk_rows(plan, job, per_elem, gpu_budget, workers))
        jobs.append(replace(job, rows_per_chunk=rows))

    def lent(name: str, shape: tuple[int, ...]) -> Source:
        """Tensor ``name`` of the plan's ``donor`` (its embeddings for a head it ties), of ``shape``."""
        c = index[plan.donor]
        have = checkpoints[c].tensors
        found = name if name in have else tied_partner(name, have)
        if found is None:
            raise PlanError(f"donor: tensor {name!r} missing from {checkpoints[c].path}, which lends the "
                            "tensors that are not merged")
        if tuple(have[found].shape) != tuple(shape):
            raise PlanError(f"donor: {found!r} of {checkpoints[c].path} is {list(have[found].shape)}, "
                            f"the output's {name!r} is {list(shape)}; choose a donor of the merged models' "
                            "shapes")
        return Source(c, found)

    def module_tensors(c: int, prefix: str) -> dict:
        """The tensors of checkpoint ``c`` under ``prefix``, by their names without it."""
        return {t[len(prefix):]: info for t, info in checkpoints[c].tensors.items() if t.startswith(prefix)}

    layer_counts: list[tuple[str | None, int]] = []
    for k, group in enumerate(groups):
        if k:
            resolved = [_slice_inputs(method, s, group.where.format(i), index, checkpoints, group.prefix) for i, s in enumerate(group.slices)]
        layer_counts.append((group.layers_key, _add_group(group.prefix, resolved, add, module_tensors)))
    if differing:
        raise PlanError(_vocab_refusal(differing))
    if plan.modules is not None:
        covered = {j.name for j in jobs}
        stray = [t for t in checkpoints[reference].tensors if t not in covered and not any(t.startswith(g.prefix) for g in groups)]
        if stray:
            raise PlanError(f"modules: tensor {stray[0]!r} of {checkpoints[reference].path} belongs to none of the modules")
    out_layer = max(n for _, n in layer_counts)
    jobs.sort(key=lambda j: (layer_index(j.name) if layer_index(j.name) is not None else (-1 if is_pre_layer(j.name) else out_layer),
                             str(checkpoints[j.inputs[0].checkpoint].file_of(j.inputs[0].tensor)),
                             checkpoints[j.inputs[0].checkpoint].offset_of(j.inputs[0].tensor)))

    if plan.models is not None:
        read = {(s.checkpoint, s.tensor) for j in jobs for s in j.inputs}
        merged = {c for sl in resolved for c in sl.checkpoints}
        for c in sorted({s.checkpoint for j in jobs for s in j.inputs} & merged):  # not a donor's leftovers
            extra = [t for t in checkpoints[c].tensors if (c, t) not in read]
            if extra:
                notes.append(f"{len(extra)} tensors of {checkpoints[c].path} are not in the output (e.g. {extra[0]!r})")
    if base_only:
        notes.append(f"{len(base_only)} tensors are base_model's: no model besides it to merge "
                     f"(e.g. {base_only[0]!r}); {method.name} writes the base, as mergekit does")
    copied = sum(j.method is None for j in jobs) - len(base_only)
    if copied:
        notes.append(f"{copied} tensors copied unchanged (not selected, or not floating point)")
    statistics: tuple[ModelStatistics | None, ...] = ()
    if method.statistics is not None:
        statistics, jobs = attach(plan, method, jobs, paths, notes)
        jobs = [_rechunked(plan, checkpoints, j, budget, gpu_budget, workers) if j.statistics else j
                for j in jobs]
    try:
        return finish_schedule(plan, method, checkpoints, jobs, notes, statistics, reference, layer_counts,
                               vocab, device, gpu_budget, workers)
    except BaseException:
        for st in statistics:
            if st is not None:
                st.close()
        raise


def _rechunked(plan: MergePlan, checkpoints: tuple[Checkpoint, ...], job: TensorJob, budget: int,
               gpu_budget: int | None, workers: int) -> TensorJob:
    """``job``'s chunk rows once its weight-shaped statistics count among its inputs and what its
    method prepares from the others is held beside its chunks. That preparation comes out of a
    budget the user set; without one, it adds to the peak instead of shrinking the default working
    set (a 7B down_proj's 462 MiB Gram left sparsegpt importance 7-row chunks: 32 s, not 19 s)."""
    per_elem = bytes_per_element(checkpoints, job, workers)
    host = budget if plan.max_memory is None else max(MIN_WORKING_BYTES, budget - _statistics_bytes(job))
    device = None if gpu_budget is None else max(MIN_WORKING_BYTES, gpu_budget - _statistics_bytes(job))
    rows = min(chunk_rows(plan, job, per_elem, b, workers) for b in (host, device) if b is not None)
    return replace(job, rows_per_chunk=rows)


def _statistics_bytes(job: TensorJob) -> int:
    """What the method's ``Statistics.prepare`` holds for ``job`` at its peak (0 without statistics)."""
    if not job.statistics:
        return 0
    return job.method.statistics.memory(job.params, job.shape, len(job.merged_inputs))


def _read_bytes(checkpoints: tuple[Checkpoint, ...], jobs: Iterable[TensorJob]) -> int:
    """Bytes of input tensors ``jobs`` read, as stored."""
    return sum(math.prod(j.shape) * checkpoints[s.checkpoint].tensors[s.tensor].dtype.itemsize
               for j in jobs for s in j.inputs)


def finish_schedule(plan: MergePlan, method: MergeMethod, checkpoints: tuple[Checkpoint, ...],
                    jobs: list[TensorJob], notes: list[str], statistics: tuple[ModelStatistics | None, ...],
                    reference: int, layer_counts: list[tuple[str | None, int]], vocab: Vocabulary | None,
                    device: Device, gpu_budget: int | None, workers: int) -> Schedule:
    """The schedule of ``jobs``: placed in shards, its peak working memory checked against
    ``max_memory`` (a MoE build's schedule is finished here too)."""
    shards, jobs = _place(jobs, plan.shard_size)
    peak = max(j.rows_per_chunk * (math.prod(j.shape) // j.rows) * bytes_per_element(checkpoints, j, workers)
               + _statistics_bytes(j) for j in jobs)
    read_bytes = _read_bytes(checkpoints, jobs)
    template = resolve_chat_template(plan.chat_template, [c.path for c in checkpoints]) if plan.chat_template else None
    baseline = psutil.Process().memory_info().rss
    if plan.max_memory is not None and plan.max_memory < baseline + peak:
        raise PlanError(_budget_too_small(plan, plan.max_memory, baseline, peak))
    return Schedule(plan, checkpoints, tuple(jobs), shards, reference, layer_counts[0][1], read_bytes, tuple(notes),
                    baseline, peak, vocab, template,
                    tuple((key, n) for key, n in layer_counts if key is not None), device, gpu_budget, workers,
                    statistics)


def _add_group(prefix: str, resolved: list[_SliceInputs], add: Any, module_tensors: Any) -> int:
    """Schedule one module's tensors through ``add``; its output layer count."""
    first, last = module_tensors(resolved[0].checkpoints[0], prefix), module_tensors(resolved[-1].checkpoints[0], prefix)
    outside = [n for n in first if layer_index(n) is None]
    untied = [h for h in TIED_HEADS if h not in outside and any(h in module_tensors(c, prefix) for c in resolved[-1].checkpoints)]
    for name in outside + untied:  # a head any input has is kept; inputs that tie it lend their embeddings
        sl = resolved[0] if is_pre_layer(name) else resolved[-1]  # embeddings from the first slice, the rest from the last
        if name in (first if is_pre_layer(name) else last) or name in untied:
            add(prefix, name, sl, [name] * len(sl.checkpoints), 0.0)
    out_layer = 0
    for sl in resolved:
        n = len(sl.layers[0])
        by_layer: dict[int, list[str]] = {}
        for t in module_tensors(sl.checkpoints[0], prefix):
            li = layer_index(t)
            if li is not None and li in sl.layers[0]:
                by_layer.setdefault(li, []).append(t)
        for j in range(n):
            for name in by_layer.get(sl.layers[0][j], []):
                add(prefix, with_layer(name, out_layer + j), sl, [with_layer(name, r[j]) for r in sl.layers], gradient_position(j, n))
        out_layer += n
    return out_layer


def _check_recorded(plan: MergePlan, paths: list[str], checkpoints: list[Any]) -> None:
    """The inputs a record names (``inputs:``) are the plan's models, unchanged since it was written."""
    for ref, record in (plan.inputs or {}).items():
        if ref not in paths:
            raise PlanError(f"inputs: {ref} is not a model of this plan; drop its entry")
        now = {f: (size, sha) for f, (size, sha) in checkpoints[paths.index(ref)].fingerprint().items()}
        for name in sorted(set(now) | set(record.files)):
            if now.get(name) != record.files.get(name):
                was, found = record.files.get(name), now.get(name)
                raise PlanError(f"inputs: {ref}: {name} is {_file_state(found)}, the record says "
                                f"{_file_state(was)}: the input changed, so the merge would not reproduce; "
                                "restore it, or drop its entry from 'inputs' to merge it as it is")


def _file_state(entry: tuple[int, str] | None) -> str:
    return "absent" if entry is None else f"{entry[0]} bytes with header sha256 {entry[1][:16]}..."


def _kept_token_rows(plan: MergePlan, vocab: Vocabulary | None, donor: Path,
                     notes: list[str]) -> tuple[int, ...]:
    """The output rows of ``select.keep_tokens_from_base``'s tokens in the tokenizer the output gets
    (a built one, else the one copied from ``tokenizer_source`` or ``donor``)."""
    wanted = plan.select.keep_tokens_from_base if plan.select is not None else None
    if wanted is None:
        return ()
    if vocab is not None:
        source, text, ids = vocab.donor, vocab.tokenizer_json, vocab.ids
    else:
        source = Path(plan.tokenizer_source) if plan.tokenizer_source not in (None, "base") else donor
        tokenizer = _load(source)
        if tokenizer is None:
            raise PlanError(f"select.keep_tokens_from_base: {source} has no tokenizer.json to find the "
                            "tokens' rows in; drop keep_tokens_from_base or give that model a fast tokenizer")
        text, ids = tokenizer.to_str(), tokenizer.get_vocab(with_added_tokens=True)
    tokens = special_tokens(text, source) if wanted == "special" else wanted
    unknown = [t for t in tokens if t not in ids]
    if wanted != "special" and unknown:
        raise PlanError(f"select.keep_tokens_from_base: {unknown[0]!r} is not a token of {source}'s "
                        "tokenizer")
    rows = tuple(sorted({ids[t] for t in tokens if t in ids}))
    notes.append(f"select.keep_tokens_from_base: rows {', '.join(map(str, rows))} of merged embeddings and "
                 "heads are the base's (else the first model's)")
    return rows


def _module_fragments(plan: MergePlan, model_type: str | None) -> tuple[str, ...] | None:
    """Every tensor-name fragment ``select.modules`` stands for in this architecture."""
    if plan.select is None or plan.select.modules is None:
        return None
    fragments: list[str] = []
    for module in plan.select.modules:
        found = module_fragments(model_type, module)
        if isinstance(found, str):
            raise PlanError(f"select.modules: {module!r}: {found}")
        fragments += found
    return tuple(fragments)


def _selected(plan: MergePlan, fragments: tuple[str, ...] | None, name: str) -> bool:
    """Whether the plan's ``select`` block lets this output tensor be merged (else it is copied)."""
    sel = plan.select
    if sel is None:
        return True
    layer = layer_index(name)
    if sel.layers is not None and (layer is None or layer not in sel.layers):
        return False
    if fragments is not None and not any(f in name for f in fragments):
        return False
    kind = "embeddings" if is_pre_layer(name) else "lm_head" if name in TIED_HEADS else None
    return kind not in sel.keep_from_base


def _common_width(sources: list[Source], shapes: list[tuple[int, ...]], checkpoints: tuple[Checkpoint, ...]) -> tuple[int, ...]:
    """The row shape every input of a re-indexed vocabulary matrix shares."""
    for src, sh in zip(sources[1:], shapes[1:]):
        if sh[1:] != shapes[0][1:]:
            raise PlanError(f"tensor {src.tensor!r}: rows of {list(sh[1:])} in {checkpoints[src.checkpoint].path} do not match "
                            f"{list(shapes[0][1:])} in {checkpoints[sources[0].checkpoint].path}")
    return tuple(shapes[0][1:])


def _output_shape(plan: MergePlan, name: str, sources: list[Source], shapes: list[tuple[int, ...]],
                  checkpoints: tuple[Checkpoint, ...], notes: list[str],
                  differing: list[tuple[str, VocabRows]]) -> tuple[int, ...]:
    """The inputs' common shape; for vocabulary matrices whose row counts differ, the rows the
    plan's ``vocab_policy`` keeps: the common rows (``truncate``) or the first input's (``base``).
    Under ``error`` the tensor and its row count per model go to ``differing``, to be refused."""
    if all(sh == shapes[0] for sh in shapes):
        return shapes[0]
    first = checkpoints[sources[0].checkpoint].path
    for src, sh in zip(sources[1:], shapes[1:]):
        if not (is_vocab_tensor(name) and sh[1:] == shapes[0][1:]):
            raise PlanError(f"tensor {src.tensor!r}: shape {list(sh)} in {checkpoints[src.checkpoint].path} does not match "
                            f"{list(shapes[0])} in {first}")
    if plan.vocab_policy == "error":
        per_model = dict.fromkeys((sh[0], str(checkpoints[s.checkpoint].path))
                                  for s, sh in zip(sources, shapes))
        differing.append((name, tuple(per_model)))
        return shapes[0]  # never merged: the plan is refused once every tensor is scheduled
    rows = min(sh[0] for sh in shapes) if plan.vocab_policy == "truncate" else shapes[0][0]
    notes.append(f"{name}: vocabulary sizes differ ({', '.join(str(sh[0]) for sh in shapes)}): "
                 f"{rows} rows kept (vocab_policy: {plan.vocab_policy})")
    return (rows, *shapes[0][1:])


def _vocab_refusal(differing: list[tuple[str, VocabRows]]) -> str:
    """One line: the vocabulary matrices whose row counts differ, their rows per model, and the fixes."""
    by_rows: dict[VocabRows, list[str]] = {}
    for name, rows in differing:
        by_rows.setdefault(rows, []).append(name)
    per_model = {rows: ", ".join(f"{n}{' rows' * (k == 0)} in {path}" for k, (n, path) in enumerate(rows))
                 for rows in by_rows}
    sizes = "; ".join(f"{' and '.join(names)} {'have' if len(names) > 1 else 'has'} {per_model[rows]}"
                      for rows, names in by_rows.items())
    return (f"vocabulary sizes differ: {sizes}, and no tokenizer block aligns them (truncating drops "
            "the extra rows, often added special tokens): add a tokenizer block (e.g. tokenizer: "
            "{source: base}), or opt in to truncation to the common rows as mergekit's "
            "--unsafe-truncate-embeddings does: vocab_policy: truncate in the plan, or "
            "--unsafe-truncate-embeddings on the command line")


def _resolve_params(method: MergeMethod, plan: MergePlan, sl: _SliceInputs, tensor: str, matched: str,
                    t: float) -> TensorParams:
    """First found wins: the model's own parameters, the slice's, the plan's; then the default.
    Filters are matched against ``matched``, the name mergekit gives ``tensor``."""
    def value(spec: Param, own: dict | None) -> Any:
        for source in (own, *sl.slice_params, plan.parameters):
            if source is not None and spec.name in source:
                v = evaluate(source[spec.name], matched, t)
                if v is not None:
                    try:  # an interpolated integer must come out whole, as mergekit validates it
                        return typed(spec, v)
                    except ValueError as e:
                        raise PlanError(f"parameters.{spec.name}: for tensor {tensor!r} the gradient "
                                        f"gives {v!r}, expected {e}") from None
        return spec.default

    globals_ = {}
    for spec in method.params:
        if not spec.per_model:
            globals_[spec.name] = value(spec, None)
            if globals_[spec.name] is None and spec.required:
                raise PlanError(f"parameters.{spec.name}: {method.name} needs {spec.name!r} (for tensor {tensor!r})")
    models = []
    for model, own in sl.params:
        per = {}
        for spec in method.params:
            if spec.per_model:
                per[spec.name] = value(spec, own)
                if per[spec.name] is None and spec.required:
                    raise PlanError(f"models: {method.name} needs parameter {spec.name!r} for model {model} (tensor {tensor!r})")
        models.append(per)
    params = TensorParams(globals_, tuple(models))
    problem = method.check(params) if method.check else None
    if problem:
        raise PlanError(f"parameters: {method.name} {problem} (tensor {tensor!r})")
    return params


def _compute_dtype(plan: MergePlan, method: MergeMethod, load: torch.dtype) -> torch.dtype:
    if plan.compute_dtype != "auto":
        return DTYPES[plan.compute_dtype]
    if method.precision == "load":
        return load
    return torch.float64 if load == torch.float64 else torch.float32


def bytes_per_element(checkpoints: tuple[Checkpoint, ...], job: TensorJob, workers: int) -> int:
    """Working bytes per element of a chunk: the raw inputs of the chunks handed to the workers,
    of those read ahead and of the one being read, each worker's compute copies and temporaries
    (deltas, stacked copies, masks, keys, the output), and the merged chunks waiting for the writer
    thread or being written. Measured on 7B-shaped merges at about 3n + 8 values of 4 bytes for n
    inputs, bfloat16 included (its masks, int32 keys and float32 sums)."""
    # weight-shaped statistics read with the inputs, float32
    rows_stats = sum(k in WEIGHT_SHAPED for k in job.statistics) * len(job.merged_inputs)
    raw = sum(checkpoints[s.checkpoint].tensors[s.tensor].dtype.itemsize for s in job.inputs) + 4 * rows_stats
    working = (3 * (len(job.inputs) + rows_stats) + 8) * max(4, job.compute_dtype.itemsize)
    written = (in_flight(workers) + 1) * job.out_dtype.itemsize
    return raw * (READ_AHEAD_CHUNKS + 1 + in_flight(workers)) + workers * working + written


def working_budget(plan: MergePlan) -> int:
    """Bytes for chunks: what the process leaves of ``max_memory``, less the allocator's slack
    (freed chunks of different sizes do not always fit each other's holes: on a 7B-shaped TIES
    merge with two workers the heap grew 440 MiB for a planned working set of 193 MiB, of which at
    most 116 MiB was live at once, counted with an allocation-counting ``LD_PRELOAD``)."""
    if plan.max_memory is None:
        return DEFAULT_WORKING_BYTES
    baseline = psutil.Process().memory_info().rss
    return max(MIN_WORKING_BYTES, int((plan.max_memory - baseline) * (1 - HEAP_SLACK)))


def _budget_too_small(plan: MergePlan, budget: int, baseline: int, working: int) -> str:
    """Why ``max_memory`` cannot hold this merge, and the smallest value that can: the predicted peak
    (what ``streammerge plan`` prints), rounded up to MiB with room for the process's own variation.
    Any budget under it gives the same chunks (the smallest, ``MIN_WORKING_BYTES``), so the same peak."""
    need = baseline + working
    smallest = -(-(need + RSS_VARIATION) // 2**20)
    chunks = ("the smallest chunks' working set" if plan.chunk_size is None
              else f"chunk_size {plan.chunk_size}'s chunks")
    given = _gib(budget) if budget >= 2**20 else f"{budget} bytes"
    return (f"max_memory (--max-memory) {given} is below this merge's predicted peak of {_gib(need)} "
            f"({_gib(baseline)} process + {_gib(working)} {chunks}); the smallest budget that works, with "
            f"{RSS_VARIATION >> 20} MiB of room for the process's own variation, is {smallest}MiB: "
            f"pass --max-memory {smallest}MiB or more")


def chunk_rows(plan: MergePlan, job: TensorJob, per_elem: int, budget: int, workers: int) -> int:
    """Rows of ``job`` per chunk: ``chunk_size`` elements when the plan gives it, else as many as
    fit ``budget`` at ``per_elem`` working bytes per element."""
    row_numel = math.prod(job.shape) // job.rows if job.rows else 0
    if row_numel == 0:
        return max(job.rows, 1)
    if plan.chunk_size is not None:
        return max(1, min(job.rows, plan.chunk_size // row_numel))
    rows = max(1, min(job.rows, budget // (row_numel * per_elem)))
    if job.method is not None and workers > 1 and math.prod(job.shape) >= SPLIT_ELEMENTS:
        rows = min(rows, -(-job.rows // workers))  # every worker gets a share of a large tensor
    return rows


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


def _gib(b: int) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def _downloads(schedule: Schedule) -> list[str]:
    """What the run downloads from the Hub and the disk it needs (none when nothing is remote)."""
    shards = hub_downloads(schedule)
    if not shards:
        return []
    size = sum(s.size for s in shards)
    models = len({s.snapshot.ref for s in shards})
    of = f"{len(shards)} shards of {models} Hub model{'s' if models > 1 else ''}"
    if schedule.plan.stream_inputs:  # a chunked tensor is read again by each statistics pass
        return [f"stream        {_gib(size)} ({size:,} bytes: {of}) read by HTTP range requests, "
                "none stored; a tensor merged in several chunks is read once per pass",
                f"disk          {_gib(schedule.write_bytes)} ({schedule.write_bytes:,} bytes: "
                "output)"]
    return [f"download      {_gib(size)} ({size:,} bytes: {of}, at the commits planned)",
            f"disk          {_gib(size + schedule.write_bytes)} ({size + schedule.write_bytes:,} bytes: "
            "downloads + output)"]


def describe(schedule: Schedule) -> str:
    """The human summary that ``streammerge plan`` prints."""
    plan = schedule.plan
    merged = sum(j.method is not None for j in schedule.jobs)
    chunked = sum(j.rows_per_chunk < j.rows for j in schedule.jobs)
    lines = [
        f"method        {plan.merge_method}",
        f"inputs        {len(schedule.checkpoints)} checkpoints" + (f" (base: {plan.base_model})" if plan.base_model else ""),
        f"tensors       {len(schedule.jobs)} ({merged} merged, {len(schedule.jobs) - merged} copied; {chunked} in several chunks)",
        f"shards        {len(schedule.shards)}: " + ", ".join(s.filename for s in schedule.shards[:3]) + (" ..." if len(schedule.shards) > 3 else ""),
        f"read          {_gib(schedule.read_bytes)}",
        f"write         {_gib(schedule.write_bytes)}",
        *_downloads(schedule),
        *describe_budget(schedule),
        f"peak memory   {_gib(schedule.predicted_peak_rss)} predicted ({_gib(schedule.baseline_rss)} "
        f"process + {_gib(schedule.peak_working_bytes)} largest chunk working set"
        + (" with its prepared statistics)" if any(j.statistics for j in schedule.jobs) else ")"),
        f"workers       {schedule.workers} chunk{'s' if schedule.workers > 1 else ''} merged at once",
    ]
    with_stats = [j for j in schedule.jobs if j.statistics]
    if with_stats:
        largest = max(with_stats, key=_statistics_bytes)
        kinds = sorted({k for j in with_stats for k in j.statistics})
        lines.append(f"statistics    {len(with_stats)} tensors read {', '.join(kinds)}; the most prepared at once: "
                     f"{_gib(_statistics_bytes(largest))} ({largest.name}), counted in the peak")
    if schedule.device_budget is not None:
        lines.append(f"device        {schedule.device.description}, "
                     f"{_gib(schedule.device_budget)} of GPU memory for chunks")

    elif schedule.device.description != "cpu":
        lines.append(f"device        {schedule.device.description}")
    dts = sorted({(str(j.compute_dtype), str(j.out_dtype)) for j in schedule.jobs if j.method is not None})
    lines.append("dtypes        " + ", ".join(f"compute {c.removeprefix('torch.')} -> write {o.removeprefix('torch.')}" for c, o in dts))
    if schedule.vocabulary is not None:
        v = schedule.vocabulary
        lines.append(f"vocabulary    {len(v.tokens)} tokens ({plan.tokenizer_spec.source}), {v.rows} embedding rows")
    lines += [f"note          {n}" for n in schedule.notes]
    if plan.adapter_output is not None:
        lines.append(f"note          adapter_output: writes the merged LoRA adapter ({plan.adapter_output.combination}), not these shards")
    return "\n".join(lines)
