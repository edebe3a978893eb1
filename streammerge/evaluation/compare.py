"""``compare``: one plan merged with several methods (or several plans), every output evaluated,
and a table of perplexity, loss, time and peak memory, with the inputs as baseline rows if asked.

A row is what ``streammerge run`` then ``streammerge eval`` give: every merge goes through
``streammerge.api.merge`` and every score through ``evaluate``, under one protocol.
"""

from __future__ import annotations

import copy
import json
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from streammerge.api import merge, schedule
from streammerge.errors import CheckpointError, OutputError, PlanError, StreamMergeError
from streammerge.evaluation.data import read_documents as read_data
from streammerge.evaluation.evaluate import evaluate, load_tokenizer
from streammerge.evaluation.peak import PeakRss
from streammerge.evaluation.windows import Protocol, cut_windows, tokenize
from streammerge.forward.skeleton import import_transformers
from streammerge.lora.reference import split_reference
from streammerge.methods import get_method, method_names
from streammerge.plan import MergePlan, load_plan
from streammerge.plan.adapters import expand_adapters
from streammerge.plan.load import PlanWarning, read_documents, resolve_model
from streammerge.plotting import agg_figure
from streammerge.verify import holds_merge

JSON_NAME, CHART_NAME = "comparison.json", "comparison.png"
NO_CHART = f"no {CHART_NAME}: it needs matplotlib; pip install 'streammerge[plot]' for the chart"


@dataclass
class Row:
    name: str
    method: str  # the merge method; "base" or "input" for a baseline row (an input, not merged)
    perplexity: float
    nll: float  # mean loss per scored token, in nats
    tokens: int  # scored tokens
    merge_seconds: float | None  # None for a baseline row
    eval_seconds: float
    peak_rss_bytes: int  # over this row's merge and evaluation
    output: str  # the merge's directory, or the input evaluated


@dataclass
class Comparison:
    rows: list[Row]
    protocol: dict[str, Any]
    data: str
    text_field: str
    dtype: str
    directory: Path
    chart: Path | None  # None without matplotlib
    notes: list[str]

    def as_dict(self) -> dict[str, Any]:
        """What comparison.json holds."""
        return {"data": self.data, "text_field": self.text_field, "protocol": self.protocol,
                "dtype": self.dtype, "rows": [asdict(r) for r in self.rows]}


@dataclass(frozen=True)
class _Job:
    name: str
    method: str
    plan: MergePlan | None  # None: a baseline, evaluated as it is
    model: str  # where the merge is written, or the input to evaluate


def compare(plans: list[str | Path] | dict[str, dict[str, Any]], data: str | Path | list[str],
            out_dir: str | Path, *,
            methods: list[str] | None = None, method_params: dict[str, dict[str, Any]] | None = None,
            with_inputs: bool = False, seqlen: int = 2048, samples: int | None = None,
            stride: int | None = None, text_field: str = "text", max_memory: int | None = None,
            dtype: str = "auto", cache_dir: str | None = None, overwrite: bool = False,
            progress: bool = False) -> Comparison:
    """Merge the one plan in ``plans`` once per method of ``methods`` (its ``merge_method``
    replaced; ``method_params[method]`` set in its top-level ``parameters``) into
    ``out_dir/<method>``, or each of several ``plans`` into ``out_dir/<file stem>`` (a mapping
    {name: plan document} is merged into ``out_dir/<name>``, its paths relative to the current
    directory: plans built in memory, as a front door builds them); evaluate every
    output on ``data`` under the protocol (``seqlen``, ``stride``, ``samples``); with
    ``with_inputs``, evaluate the base model and every input model too, unmerged. Writes
    ``out_dir/comparison.json`` and, with matplotlib, ``out_dir/comparison.png``.
    ``max_memory`` bounds each merge and each evaluation. Everything is checked before the first merge."""
    built = plans if isinstance(plans, dict) else {}
    for name in built:
        if not name or Path(name).name != name or Path(name).stem != name:
            raise PlanError(f"plan name {name!r}: it names the output directory and the row; use a name "
                            "without '/' or '.'")
    paths = [Path(p) for p in plans]
    method_params = method_params or {}
    _check_request(paths, methods, method_params)
    protocol = Protocol(seqlen=seqlen, stride=stride, samples=samples)
    documents = list(data) if isinstance(data, list) else read_data(str(data), text_field)
    out_dir = Path(out_dir).expanduser().absolute()
    raw = {p: copy.deepcopy(built[str(p)]) if built else _plan_document(p) for p in paths}
    with _each_warning_once():
        if methods is not None:
            path = paths[0]
            merges = [_Job(m, m, _method_plan(raw[path], path, m, method_params.get(m, {}), cache_dir,
                                              max_memory, out_dir / m, overwrite), str(out_dir / m))
                      for m in methods]
        else:
            merges = []
            for p in paths:
                plan = _loaded(raw[p], p, cache_dir, max_memory, out_dir / p.stem, overwrite)
                merges.append(_Job(p.stem, plan.merge_method, plan, str(out_dir / p.stem)))
        inputs = _input_jobs(raw, cache_dir)
    import_transformers()  # before the first merge; and the first row's eval time is not the import's
    if inputs:
        _check_windows(inputs[0].model, documents, protocol)
    jobs = (inputs if with_inputs else []) + merges
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, notes = [], []
    for number, job in enumerate(jobs, 1):
        if progress:
            doing = (f"evaluating the input {job.model}" if job.plan is None
                     else f"merging with {job.method} into {job.model}, then evaluating it")
            print(f"[{number}/{len(jobs)}] {job.name}: {doing}", file=sys.stderr, flush=True)
        merge_seconds = None
        with PeakRss() as peak:
            if job.plan is not None:
                merged = merge(job.plan, job.model, overwrite=overwrite, quiet=not progress,
                               max_memory=max_memory)
                merge_seconds = merged.seconds
                if merged.up_to_date:
                    notes.append(f"{job.name}: {job.model} already held this merge; it was not merged again "
                                 "(--overwrite merges it again)")
            result = evaluate(job.model, documents, seqlen=seqlen, samples=samples, stride=stride,
                              dtype=dtype, max_memory=max_memory, cache_dir=cache_dir, progress=progress)
        assert result.perplexity is not None and result.nll is not None  # data given: windows were scored
        rows.append(Row(job.name, job.method, result.perplexity, result.nll, result.tokens, merge_seconds,
                        result.seconds, peak.bytes, job.model))
    source = f"{len(documents)} documents given in Python" if isinstance(data, list) else str(data)
    comparison = Comparison(rows, protocol.as_dict(), source, text_field, dtype, out_dir, None, notes)
    (out_dir / JSON_NAME).write_text(json.dumps(comparison.as_dict(), indent=2) + "\n")
    if _draw(rows, out_dir / CHART_NAME, f"{source}: {protocol.name} windows of {protocol.seqlen} tokens"):
        comparison.chart = out_dir / CHART_NAME
    else:
        notes.append(NO_CHART)
    return comparison


def _check_request(paths: list[Path], methods: list[str] | None,
                   method_params: dict[str, dict[str, Any]]) -> None:
    if not paths:
        raise PlanError("no plan given: give one plan with --methods, or several plans")
    if methods is None:
        if method_params:
            raise PlanError(f"--param {next(iter(method_params))}.…: parameters per method go with "
                            "--methods; without it each plan's own parameters are used")
        stems = [p.stem for p in paths]
        twice = next((s for s in stems if stems.count(s) > 1), None)
        if twice is not None:
            raise PlanError(f"two plans are named {twice!r} (rows and output directories are named by "
                            "the file name); rename one")
        return
    if len(paths) > 1:
        raise PlanError(f"--methods runs one plan with each method, but {len(paths)} plans were given; "
                        "give one plan with --methods, or several plans without it")
    if not methods:
        raise PlanError("--methods: no method given; name one or more, e.g. --methods ties dare_ties")
    valid = method_names()
    for m in methods:
        if m not in valid:
            raise PlanError(f"--methods: unknown method {m!r} (valid: {', '.join(valid)})")
        if methods.count(m) > 1:
            raise PlanError(f"--methods: {m} is given twice; name each method once")
    for m, params in method_params.items():
        if m not in methods:
            raise PlanError(f"--param {m}.{next(iter(params), 'KEY')}: {m!r} is not in --methods "
                            f"({' '.join(methods)}); add it there or drop the parameter")
        takes = sorted(p.name for p in get_method(m).params)
        for name in params:
            if name not in takes:
                raise PlanError(f"--param {m}.{name}: {m} has no parameter {name!r} "
                                f"(valid: {', '.join(takes) or 'none'})")


def _plan_document(path: Path) -> dict[str, Any]:
    documents = read_documents(path)
    if len(documents) > 1:
        raise PlanError(f"{path}: holds {len(documents)} documents (a mergekit-multi file); compare takes "
                        "single-document plans: put the document to compare in a file of its own")
    doc = documents[0] if documents else None
    if not isinstance(doc, dict):
        raise PlanError(f"{path}: a plan is a YAML mapping with at least 'merge_method' and 'models', "
                        "'slices' or 'modules'")
    if doc.get("adapter_output") is not None:
        raise PlanError(f"{path}: adapter_output: compare evaluates merged models, not adapters; "
                        "remove adapter_output from the plan to compare it")
    return doc


@contextmanager
def _each_warning_once() -> Iterator[None]:
    """Every plan variant repeats its plan's own warnings: each distinct one is shown once, also
    when loading stops at an error."""
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        seen = set()
        for w in caught:
            if (w.category, str(w.message)) not in seen:
                seen.add((w.category, str(w.message)))
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _parts(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The plan and each of its modules, with the prefix naming their keys: the mappings that hold
    models, slices and parameters."""
    modules = doc.get("modules")
    named = modules.items() if isinstance(modules, dict) else ()
    return [("", doc), *((f"modules.{name}.", m) for name, m in named if isinstance(m, dict))]


def _dicts(items: Any) -> list[dict[str, Any]]:
    return [e for e in items if isinstance(e, dict)] if isinstance(items, list) else []


def _sections(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every parameters mapping of a raw plan, with where it is."""
    for at, part in _parts(doc):
        owners = [(at, part)]
        owners += [(f"{at}models[{i}].", m) for i, m in enumerate(_dicts(part.get("models")))]
        for k, s in enumerate(_dicts(part.get("slices"))):
            owners.append((f"{at}slices[{k}].", s))
            sources = _dicts(s.get("sources"))
            owners += [(f"{at}slices[{k}].sources[{i}].", src) for i, src in enumerate(sources)]
        for where, owner in owners:
            if isinstance(owner.get("parameters"), dict):
                yield f"{where}parameters", owner["parameters"]


def _method_plan(doc: dict[str, Any], path: Path, method: str, params: dict[str, Any], cache_dir: str | None,
                 max_memory: int | None, output: Path, overwrite: bool) -> MergePlan:
    """The plan at ``path`` with ``method`` as its merge method and ``params`` in its parameters.
    Parameters of the plan's own method that ``method`` does not take are left out, with one
    warning each; the rest is checked as the plan's loading checks it."""
    doc = copy.deepcopy(doc)
    own = doc.get("merge_method")
    own_takes = {p.name for p in get_method(own).params} if own in method_names() else set()
    takes = {p.name for p in get_method(method).params}
    dropped: dict[str, list[str]] = {}
    for where, section in _sections(doc):
        for name in [k for k in section if k in own_takes - takes]:
            del section[name]
            dropped.setdefault(name, []).append(where)
        shadowing = sorted(params.keys() & section.keys()) if where != "parameters" else []
        for name in shadowing:  # as in mergekit, a model's, slice's or module's value wins over the top's
            warnings.warn(f"{path}: {where}.{name} takes precedence over --param {method}.{name}="
                          f"{params[name]!r} there", PlanWarning, stacklevel=2)
    for name, places in dropped.items():
        warnings.warn(f"{path}: {', '.join(places)}: {name!r} is a parameter of {own}, not of {method}; "
                      f"the {method} merge leaves it out", PlanWarning, stacklevel=2)
    top = doc.get("parameters")
    if params and (top is None or isinstance(top, dict)):
        doc["parameters"] = {**(top or {}), **params}
    doc["merge_method"] = method
    return _loaded(doc, path, cache_dir, max_memory, output, overwrite,
                   f" (in the plan merged with {method})")


def _loaded(doc: dict[str, Any], path: Path, cache_dir: str | None, max_memory: int | None, output: Path,
            overwrite: bool, suffix: str = "") -> MergePlan:
    """The plan, with its schedule built from the headers once: what only the schedule checks
    (model counts, shapes) and an output in the way stop compare before the first merge."""
    try:
        plan = load_plan(doc, None, cache_dir, root=path.parent, where=str(path))
    except PlanError as e:
        raise PlanError(f"{e}{suffix}") from None
    try:
        sched = schedule(plan, max_memory=max_memory)
    except StreamMergeError as e:
        raise type(e)(f"{path}: {e}{suffix}") from None
    try:
        if not overwrite and output.exists() and not holds_merge(output, sched):
            raise OutputError(f"{output}: output already exists and holds another merge; pass --overwrite to "
                              "replace it, or choose another -o")
    finally:
        sched.close()
    return plan


def _input_jobs(raw: dict[Path, dict[str, Any]], cache_dir: str | None) -> list[_Job]:
    """A baseline per distinct input model of the plans, base models first, then in plan order."""
    found: dict[str, tuple[str, bool]] = {}  # resolved -> (reference as written, is a base model)
    for path, doc in raw.items():
        doc = expand_adapters(doc, str(path))
        for _, part in _parts(doc):
            slices = _dicts(part.get("slices"))
            bases = [part.get("base_model"), *(s.get("base_model") for s in slices)]
            models = [e.get("model") for e in _dicts(part.get("models"))]
            models += [src.get("model") for s in slices for src in _dicts(s.get("sources"))]
            for ref, base in [*((b, True) for b in bases), *((m, False) for m in models)]:
                if isinstance(ref, str):
                    resolved = resolve_model(ref, cache_dir or doc.get("cache_dir"), root=path.parent)
                    written, was_base = found.get(resolved, (ref, False))
                    found[resolved] = (written, was_base or base)
    ordered = sorted(found.items(), key=lambda item: not item[1][1])  # stable: plan order kept within each
    names = [_short(written) for _, (written, _) in ordered]
    return [_Job(name if names.count(name) == 1 else written, "base" if base else "input", None, resolved)
            for name, (resolved, (written, base)) in zip(names, ordered)]


def _check_windows(model: str, documents: list[str], protocol: Protocol) -> None:
    """Data too short for one window stops compare before the first merge. It is cut with the
    first input's tokenizer: the one merges copy from the base in the usual case."""
    try:
        tokenizer = load_tokenizer(Path(split_reference(model)[0]))
    except CheckpointError:
        return  # evaluating a model without a tokenizer says so, for that model
    cut_windows(tokenize(tokenizer, documents, protocol.join), protocol)


def _short(ref: str) -> str:
    """A row name for a model reference: a path's last component (``org/name`` stays whole)."""
    parts = ref.split("+")
    return "+".join(Path(p).name if Path(p).expanduser().is_absolute() else p for p in parts)


def _draw(rows: list[Row], path: Path, title: str) -> bool:
    """A bar chart of the rows' perplexities; False where matplotlib is not installed."""
    figure = agg_figure(figsize=(max(4.0, 1.0 + 0.8 * len(rows)), 4.5), layout="constrained")
    if figure is None:
        return False
    from matplotlib.patches import Patch

    merged, baseline = "tab:blue", "tab:gray"
    values = [r.perplexity for r in rows]
    axes = figure.add_subplot()
    colors = [baseline if r.merge_seconds is None else merged for r in rows]
    bars = axes.bar(range(len(rows)), values, color=colors)
    axes.bar_label(bars, labels=[f"{v:.4g}" for v in values], fontsize=8)
    axes.set_xticks(range(len(rows)), [r.name for r in rows], rotation=30, ha="right")
    if max(values) / min(values) > 10:  # a wide range: on a linear axis the good rows look alike
        axes.set_yscale("log")
    axes.set_ylabel("perplexity (lower is better)")
    axes.set_title(title, fontsize=10)
    if any(r.merge_seconds is None for r in rows):
        axes.legend(handles=[Patch(color=merged, label="merge"), Patch(color=baseline, label="input")],
                    fontsize=8)
    figure.savefig(path, dpi=120)
    return True
