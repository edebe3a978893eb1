"""Statistics of calibration data as a merge reads them: extra, read-only inputs of tensor jobs.

Each merged model's ``calibration`` (its entry's, else the plan's) names a statistics directory,
or data that ``streammerge.calibration.calibrate.cached_stats`` measures into a cached one. A
tensor uses the kinds its method asks for (``Statistics.kinds``) when some model's directory
describes it; then every merged model must have each kind for it, of the tensor's shape. All of
this is checked from manifests and headers, before any weight is read.
"""

from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import dataclass, field, replace
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch

from streammerge.calibration.statsdir import MANIFEST, StatsDir
from streammerge.errors import PlanError
from streammerge.methods import MergeMethod
from streammerge.plan.schema import Calibration, MergePlan, Module

if TYPE_CHECKING:  # the schedule imports this module
    from streammerge.schedule import Source, TensorJob

# Kinds with the weight's own shape, read per row chunk like the weight (the rest are per input column).
WEIGHT_SHAPED = frozenset({"fisher"})
# results of ``derived`` kept per model: weights sharing an input are scheduled close together
DERIVED_KEPT = 8
NORM_ELEMENTS = 1 << 22  # read at a time to sum a statistic's squares (32 MiB in float64)
_ADD = ("add calibration: {data: FILE} (or {stats: DIR} from streammerge calibrate) to its entry or "
        "to the plan")


@dataclass
class ModelStatistics:
    """One model's statistics directory, read a tensor (or rows of one) at a time."""

    model: str
    directory: StatsDir
    _norms: dict[str, float] = field(default_factory=dict)
    _derived: OrderedDict = field(default_factory=OrderedDict)
    # the reader thread reads weight-shaped rows while the merging thread prepares: StatsDir opens
    # its files lazily, one reader each
    _lock: threading.RLock = field(default_factory=threading.RLock)

    def read(self, weight: str, kind: str, rows: slice | None = None) -> torch.Tensor:
        with self._lock:
            out = self.directory.read(weight, kind, rows).to(torch.float32)
            self.directory.release(weight, kind)
        return out

    def norm(self, kind: str) -> float:
        """‖S‖₂ of statistic ``kind`` over every tensor the directory holds it for (a stored tensor
        that several weights share counts once), read ``NORM_ELEMENTS`` at a time, once per run (a
        7B embedding's Fisher whole, squared in float64, would be 2 GiB)."""
        with self._lock:
            if kind not in self._norms:
                stored = {tuple(kinds[kind]): weight for weight, kinds in self.directory.entries.items()
                          if kind in kinds}
                total = 0.0
                for weight in sorted(stored.values()):
                    shape = tuple(self.directory.shape(weight, kind))
                    rows = max(1, NORM_ELEMENTS // max(1, math.prod(shape[1:])))
                    pieces = [slice(r, r + rows) for r in range(0, shape[0], rows)] if shape else [None]
                    for piece in pieces:
                        total += float(self.read(weight, kind, piece).double().square().sum())
                self._norms[kind] = total ** 0.5
            return self._norms[kind]

    def derived(self, weight: str, kind: str, how: Any,
                compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``compute(statistic)``, computed once for weights that share the stored statistic (q, k and
        v share their input's Gram) and the same ``how`` (the parameters ``compute`` depends on)."""
        key = (*self.directory.entries[weight][kind], how)
        if key not in self._derived:
            self._derived[key] = compute(self.read(weight, kind))
            if len(self._derived) > DERIVED_KEPT:
                self._derived.popitem(last=False)
        return self._derived[key]

    def fingerprint(self) -> str:
        """A digest of the manifest (provenance, and each statistic's file and name)."""
        return hashlib.sha256((self.directory.path / MANIFEST).read_bytes()).hexdigest()

    def close(self) -> None:
        self.directory.close()


def calibrations(plan: MergePlan) -> dict[str, Calibration | None]:
    """Each model path's calibration: its entry's (models, slice sources, modules), else the plan's."""
    out: dict[str, Calibration | None] = {}
    merges: list[MergePlan | Module] = [plan] if plan.modules is None else list(plan.modules.values())
    entries = [e for m in merges for e in (m.models or [])]
    entries += [src for m in merges for s in (m.slices or []) for src in s.sources]
    for e in entries:
        spec = e.calibration or plan.calibration
        if out.get(e.model, spec) != spec:
            raise PlanError(f"calibration: model {e.model} is given two different calibrations; give it one")
        out[e.model] = spec
    return out


def _expected_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape statistic ``kind`` of a weight of ``shape`` has (None: the kind has no such weight)."""
    if kind in WEIGHT_SHAPED:
        return shape
    if len(shape) != 2:
        return None
    return (shape[1], shape[1]) if kind == "gram" else (shape[1],)


def attach(plan: MergePlan, method: MergeMethod, jobs: list[TensorJob], paths: list[str],
           notes: list[str]) -> tuple[tuple[ModelStatistics | None, ...], list[TensorJob]]:
    """Each checkpoint's statistics (None where unused) and ``jobs`` with the kinds each one reads
    (``TensorJob.statistics``); refuses, naming the model and what to add, a merged model that lacks
    statistics its method needs."""
    stats_of = method.statistics
    wanted: dict[int, set[str]] = {}
    for job in (j for j in jobs if j.method is not None):
        for src in job.merged_inputs:
            wanted.setdefault(src.checkpoint, set()).update(stats_of.kinds(job.params))
    specs = calibrations(plan)
    opened: dict[int, ModelStatistics] = {}
    try:
        for c, kinds in sorted(wanted.items()):
            if kinds:
                opened[c] = _open(plan, method, paths[c], specs.get(paths[c]), sorted(kinds), notes)
        out = [replace(j, statistics=_job_kinds(j, stats_of.kinds(j.params), [(s, opened[s.checkpoint])
                                                                               for s in j.merged_inputs]))
               if j.method is not None and stats_of.kinds(j.params) else j for j in jobs]
        for c, st in opened.items():
            if not any(j.statistics and any(s.checkpoint == c for s in j.merged_inputs) for j in out):
                raise PlanError(f"model {paths[c]}: its statistics directory {st.directory.path} "
                                "describes none of the tensors merged (statistics of another model?): "
                                "calibrate this model")
    except BaseException:
        for st in opened.values():
            st.close()
        raise
    return tuple(opened.get(c) for c in range(len(paths))), out


def _open(plan: MergePlan, method: MergeMethod, path: str, spec: Calibration | None, kinds: list[str],
          notes: list[str]) -> ModelStatistics:
    """Model ``path``'s statistics directory, measured first when its calibration names data."""
    what = f"{method.name} reads {', '.join(kinds)} statistics of each model"
    if spec is None:
        raise PlanError(f"model {path}: {what}, and it has no calibration: {_ADD}")
    if spec.data is not None:
        # the layer stream loads only when measuring
        from streammerge.calibration.calibrate import cached_stats

        # the default statistics cache ($STREAMMERGE_CACHE); plan.cache_dir is the Hub's model cache
        directory = cached_stats(path, spec.model_dump(exclude={"stats"}), kinds, None)
    else:
        directory = spec.stats
    st = ModelStatistics(path, StatsDir(directory))
    missing = [k for k in kinds if k not in st.directory.kinds]
    if missing:
        st.close()
        every = ",".join(sorted(set(kinds) | set(st.directory.kinds)))
        raise PlanError(f"model {path}: {what}; its statistics directory {st.directory.path} has "
                        f"no {missing[0]} (it has {', '.join(st.directory.kinds) or 'none'}): recompute "
                        f"it with streammerge calibrate --stats {every}, or give calibration: "
                        "{data: FILE}")
    notes.append(f"statistics of {path}: {st.directory.path} ({', '.join(kinds)})")
    return st


def _job_kinds(job: TensorJob, kinds: Iterable[str],
               models: list[tuple[Source, ModelStatistics]]) -> tuple[str, ...]:
    """The kinds ``job`` reads: those of ``kinds`` a tensor of its shape can have, when any model's
    directory describes the tensor with one (each model must then have each, of the right shape)."""
    # rows that are not the model's own
    remapped = any(src.row_map is not None or src.rows is not None for src, _ in models)
    kinds = sorted(k for k in kinds
                   if _expected_shape(k, job.shape) is not None and not (remapped and k in WEIGHT_SHAPED))
    if not any(st.directory.has(src.tensor, k) for src, st in models for k in kinds):
        return ()
    for src, st in models:
        for k in kinds:
            if not st.directory.has(src.tensor, k):
                raise PlanError(f"model {st.model}: no {k} statistics for tensor {src.tensor!r} in "
                                f"{st.directory.path} (other models have them): recompute it with "
                                f"streammerge calibrate --stats {','.join(kinds)}")
            got, expected = tuple(st.directory.shape(src.tensor, k)), _expected_shape(k, job.shape)
            if got != expected:
                raise PlanError(f"model {st.model}: {k} statistics of {src.tensor!r} in "
                                f"{st.directory.path} have shape {list(got)}, expected "
                                f"{list(expected)} (statistics of another model?): calibrate this model")
    return tuple(kinds)


@dataclass
class JobStatistics:
    """``TensorStatistics`` for one job: whole statistics of its merged models, read on demand."""

    name: str
    shape: tuple[int, ...]
    sources: tuple[tuple[ModelStatistics, str], ...]  # (statistics, checkpoint weight name) per merged model
    note: Callable[[str], None]

    def read(self, i: int, kind: str) -> torch.Tensor:
        st, weight = self.sources[i]
        return st.read(weight, kind)

    def norm(self, i: int, kind: str) -> float:
        return self.sources[i][0].norm(kind)

    def derived(self, i: int, kind: str, how: Any,
                compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        st, weight = self.sources[i]
        return st.derived(weight, kind, how, compute)
