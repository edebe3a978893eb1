"""What a merge method is: a pure function over row chunks, plus optional statistics passes.

The engine feeds a method one row chunk of every input at a time (``Chunk``). Methods that need a
whole-tensor statistic (a k-th largest magnitude, a dot product, an L1 norm) declare ``StatPass``es:
``run_passes`` runs each pass over all chunks, *adds* the partial results (or, for a ``per_chunk``
pass, lists them in chunk order), and hands them to the pass's ``finish``, whose result (``stats``)
the next pass and the final ``merge`` receive. A pass with a ``when`` runs only if it holds.

Partials are added, so they must be exact under addition for the result not to depend on the chunk
size: integer counts, or floating values per row scattered into a rows-long vector (``per_row``),
where adding zeros is exact. ``finish`` then reduces the rows in a fixed order.
"""

from __future__ import annotations

import functools
import mmap
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol

import torch

Stats = Mapping[str, Any]


@dataclass(frozen=True)
class TensorParams:
    """Parameters resolved for one tensor: method-wide values and one mapping per model."""

    globals: Mapping[str, Any]
    models: tuple[Mapping[str, Any], ...]

    def per_model(self, name: str) -> list[Any]:
        return [m[name] for m in self.models]


@dataclass(frozen=True)
class Chunk:
    """Rows ``[row_start, row_stop)`` of one output tensor's inputs.

    ``base`` and ``models`` are the inputs in the compute dtype; ``models`` excludes the base for
    methods that take one. The engine hands them over as loaded (``loaded_base``,
    ``loaded_models``, in the plan's load dtype) with the ``compute_dtype`` to widen them to, and
    they are widened on first use: a compiled kernel that widens each value as it loads it reads
    the loaded inputs and never makes the widened copies (for a bfloat16 linear merge in float32,
    torch's widening alone took longer than the merge after it). ``model_ids`` are stable
    per-model keys (the model's position in the plan) for counter-based randomness. ``wide``: an
    explicit ``compute_dtype`` asks for float64 statistics; otherwise (``auto``) methods follow
    mergekit's dtypes and order of operations (``reductions``).
    """

    name: str
    shape: tuple[int, ...]
    loaded_base: torch.Tensor | None
    loaded_models: list[torch.Tensor]
    params: TensorParams
    row_start: int
    row_stop: int
    seed: int
    model_ids: tuple[int, ...]
    wide: bool = False
    calibration: tuple[Mapping[str, Any], ...] = ()
    compute_dtype: torch.dtype | None = None  # None: the loaded inputs are in it already

    @functools.cached_property
    def base(self) -> torch.Tensor | None:
        return None if self.loaded_base is None else self._widened(self.loaded_base)

    @functools.cached_property
    def models(self) -> list[torch.Tensor]:
        return [self._widened(x) for x in self.loaded_models]

    def _widened(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.compute_dtype is None else x.to(self.compute_dtype)

    @property
    def total_rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def element_start(self) -> int:
        """Flat index of this chunk's first element in the whole tensor."""
        return self.row_start * (self.numel // self.total_rows if self.total_rows else 0)

    def per_row(self, values: torch.Tensor) -> torch.Tensor:
        """Scatter per-row values ``[..., chunk_rows]`` into a zero ``[..., total_rows]`` vector."""
        out = values.new_zeros((*values.shape[:-1], self.total_rows))
        out[..., self.row_start : self.row_stop] = values
        return out


@dataclass(frozen=True)
class StatPass:
    collect: Callable[[Chunk, Stats], dict[str, Any]]
    finish: Callable[[dict[str, Any], Chunk, Stats], Stats]
    per_chunk: bool | frozenset[str] = False  # finish gets each key's (or these keys') partials as a list in chunk order, not their sum
    when: Callable[[Stats], bool] | None = None  # run only when this holds for the stats so far


def run_passes(passes: Iterable[StatPass], chunks: Callable[[], Iterable[Any]], map_chunks: Callable = map) -> Stats:
    """The stats ``merge`` needs: each pass over every chunk (``chunks()`` yields them in row order,
    or what ``map_chunks`` makes them from). ``map_chunks(f, chunks())`` may run ``collect`` on
    several chunks at once but must keep their order: partials are added in row order, so the sums
    do not depend on how they were computed."""
    stats: Stats = {}
    for p in passes:
        if p.when is not None and not p.when(stats):
            continue
        totals: dict[str, Any] = {}
        last = None
        kept = _Kept()
        for c, parts in map_chunks(lambda c: (c, p.collect(c, stats)), chunks()):
            for key, part in parts.items():
                if p.per_chunk is True or (p.per_chunk and key in p.per_chunk):
                    totals.setdefault(key, []).append(kept.keep(part))
                else:
                    totals[key] = totals[key] + part if key in totals else part
            last = c
        stats = p.finish(totals, last, stats)
    return stats


class _Kept:
    """Copies of the per-chunk partials a pass keeps until its ``finish``, in blocks mapped apart from
    the heap. Left in glibc's heap, hundreds of small tensors that outlive their chunk split the
    holes the chunks' large temporaries leave, and the next chunk's land higher: a 4-layer 7B-shaped
    TIES merge grew its heap to 0.6 GiB (0.47 GiB of it free) while 0.16 GiB was live; with its
    TIES histograms kept here, peak RSS fell from 0.69-0.77 to 0.39-0.41 GiB."""

    BLOCK = 4 << 20

    def __init__(self) -> None:
        self._block: torch.Tensor | None = None
        self._at = 0

    def keep(self, part: Any) -> Any:
        """``part`` with its small CPU tensors (in lists, tuples and dicts too) copied into the blocks."""
        if isinstance(part, torch.Tensor):
            return self._copy(part)
        if isinstance(part, (list, tuple)):
            return type(part)(self.keep(p) for p in part)
        if isinstance(part, dict):
            return {k: self.keep(v) for k, v in part.items()}
        return part

    def _copy(self, t: torch.Tensor) -> torch.Tensor:
        n = t.numel() * t.element_size()
        if t.device.type != "cpu" or not 0 < n <= self.BLOCK // 4:
            return t
        if self._block is None or self._at + n > self.BLOCK:
            self._block, self._at = torch.frombuffer(mmap.mmap(-1, self.BLOCK), dtype=torch.uint8), 0
        out = self._block[self._at : self._at + n].view(t.dtype).view(t.shape).copy_(t)
        self._at += -(-n // 64) * 64  # every dtype's alignment
        return out


@dataclass(frozen=True)
class Param:
    """A method parameter. ``per_model`` parameters are read per model, others once per tensor."""

    name: str
    kind: type
    default: Any = None
    required: bool = False
    per_model: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    doc: str = ""
    choices: tuple[str, ...] = ()  # the values a ``str`` parameter takes

    def check(self, value: Any) -> str | None:
        """None if ``value`` (already of ``kind``: ``plan.parameters.typed``) is in range, else what
        would be valid. NaN is in no range."""
        if self.kind is bool:
            return None
        if self.kind is str:
            return None if value in self.choices else self.expected()
        above = self.low is None or value > self.low or (value == self.low and not self.low_open)
        below = self.high is None or value <= self.high
        return None if above and below else self.expected()

    def expected(self) -> str:
        """What a valid value is, for messages."""
        if self.kind is bool:
            return "true or false (or yes/no, on/off, 1/0)"
        if self.kind is str:
            return "one of " + ", ".join(self.choices)
        return f"{'an integer' if self.kind is int else 'a number'}{self._range()}"

    def _range(self) -> str:
        if self.low is None and self.high is None:
            return ""
        lo = "" if self.low is None else f"{self.low} {'<' if self.low_open else '<='} "
        hi = "" if self.high is None else f" <= {self.high}"
        return f" with {lo}{self.name}{hi}"


class TensorStatistics(Protocol):
    """One tensor's statistics of calibration data, as ``Statistics.prepare`` reads them."""

    name: str  # the output tensor
    shape: tuple[int, ...]

    def read(self, i: int, kind: str) -> torch.Tensor:
        """Model i's whole statistic ``kind`` for this tensor, float32 (``gram`` [in, in],
        ``sqnorm`` [in])."""

    def norm(self, i: int, kind: str) -> float:
        """The L2 norm of model i's statistic ``kind`` over every tensor of the model (computed once
        a model)."""

    def derived(self, i: int, kind: str, how: Any,
                compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``compute`` of model i's statistic, computed once for the weights that share it (q, k and v
        share a Gram) and the same ``how``; ``compute`` may overwrite its argument."""

    def note(self, text: str) -> None:
        """Report something about this tensor's merge (the run's notes)."""


@dataclass(frozen=True)
class Statistics:
    """What a method reads of each model's statistics of calibration data (``streammerge.calibration``).

    ``kinds(params)``: the kinds it uses (gram, sqnorm, fisher) for a tensor that has them. A tensor
    has them when a model's statistics directory describes it; then every merged model must have
    each kind for it (the schedule checks, before any weight is read). Weight-shaped kinds (fisher)
    reach the method per row chunk in ``Chunk.calibration``; the others only through ``prepare``,
    which runs once per tensor before its chunks and returns, per model, what the chunks get
    (e.g. an inverse-Hessian diagonal of [in] instead of a Gram of [in, in]). ``memory(params, shape, n)``:
    the bytes ``prepare`` holds at its peak for a tensor of ``shape`` and ``n`` models, at least what
    it hands to the chunks; the schedule adds them to the tensor's chunk working set.
    """

    kinds: Callable[[TensorParams], frozenset[str]]
    prepare: Callable[[TensorParams, TensorStatistics], tuple[dict[str, Any], ...]] | None = None
    memory: Callable[[TensorParams, tuple[int, ...], int], int] = lambda params, shape, n: 0


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    ``base``: "required" (task-vector methods, slerp's t = 0 end), "optional" (used as the base
    when the plan names one), or "model" (the base, if any, is one more model, as mergekit treats
    it for linear and karcher). ``Chunk.base`` is None unless the method takes a base. ``precision``: "load" computes in the plan's ``dtype`` (mergekit's
    task-arithmetic family), "float32" computes in at least float32 (mergekit's linear and slerp).
    """

    name: str
    merge: Callable[[Chunk, Stats], torch.Tensor]
    params: tuple[Param, ...]
    base: str
    precision: str
    paper: str
    passes: tuple[StatPass, ...] | Callable[[TensorParams], tuple[StatPass, ...]] = ()  # a function: passes depend on parameters
    models_exactly: int | None = None  # counting the base, when the method takes one
    # Not counting the base; 0: with none, the output is the base (as mergekit returns it).
    min_models: int = 1

    max_models: int | None = None  # not counting the base
    check: Callable[[TensorParams], str | None] | None = None  # rules across parameters: what is wrong, or None
    statistics: Statistics | None = None  # what it reads of calibration statistics, if anything
    doc: str = field(default="", compare=False)

    def passes_for(self, params: TensorParams) -> tuple[StatPass, ...]:
        return self.passes(params) if callable(self.passes) else self.passes
