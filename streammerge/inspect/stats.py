"""How far two models are apart, tensor by tensor, read a row chunk at a time.

For every tensor both models hold with the same shape, float64 sums are accumulated over row
chunks: ‖A‖², ‖B‖², ⟨A, B⟩, ‖A − B‖², and with a base the same of the task vectors
a = A − base and b = B − base plus the count of elements where a and b have opposite signs
(an element where either is exactly zero is no disagreement). Every figure derives from these
sums, so a summary over a group of tensors (a layer, a module kind, the whole model) is the
figure of the group's tensors taken as one long vector. Memory is a few chunks, never a tensor.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
from tqdm import tqdm

from streammerge.cli_common import aligned_table
from streammerge.errors import OutputError
from streammerge.io.reader import Checkpoint
from streammerge.lora.overlay import AdaptedCheckpoint, open_checkpoints
from streammerge.plan.architecture import after_layer, is_pre_layer, layer_index, tied_partner
from streammerge.plan.load import resolve_model
from streammerge.plotting import agg_figure, require_matplotlib

CHUNK_ELEMENTS = 1 << 21  # elements per model read at a time (16 MiB in float64)
STATS_NAME = "merge_stats.json"  # what ``streammerge run --stats`` writes into the output
_NUMBER = re.compile(r"(?<=\.)\d+(?=\.|$)")

Opened = Checkpoint | AdaptedCheckpoint


@dataclass
class Sums:
    """The float64 sums every figure is computed from (``task_*`` and ``conflicts``: with a base)."""

    tensors: int = 0
    elements: int = 0
    aa: float = 0.0
    bb: float = 0.0
    ab: float = 0.0
    dd: float = 0.0  # ‖A − B‖², summed directly rather than from the three above: no cancellation
    task_aa: float = 0.0
    task_bb: float = 0.0
    task_ab: float = 0.0
    conflicts: int = 0

    def add(self, other: Sums) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def figures(self, with_base: bool) -> dict[str, float | int | None]:
        """l2_diff, rel_change, cosine (and task_cosine, sign_disagreement); None where a norm
        they divide by is zero."""
        out: dict[str, float | int | None] = {
            "l2_diff": math.sqrt(self.dd),
            "rel_change": _ratio(math.sqrt(self.dd), math.sqrt(self.aa)),
            "cosine": _ratio(self.ab, math.sqrt(self.aa) * math.sqrt(self.bb)),
            "norm_a": math.sqrt(self.aa), "norm_b": math.sqrt(self.bb), "elements": self.elements,
        }
        if with_base:
            out["task_cosine"] = _ratio(self.task_ab, math.sqrt(self.task_aa) * math.sqrt(self.task_bb))
            out["sign_disagreement"] = _ratio(self.conflicts, self.elements)
        return out


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def layer_group(tensor: str) -> str:
    """A tensor's layer: its layer number, else "pre" (embeddings) or "post" (final norm, head)."""
    n = layer_index(tensor)
    return str(n) if n is not None else "pre" if is_pre_layer(tensor) else "post"


def module_kind(tensor: str) -> str:
    """A tensor's module kind, from its name: the part after the layer number (the whole name for
    a tensor outside the layers), further numbers (experts) as ``*``, and a final ``.weight``
    dropped: ``model.layers.3.self_attn.q_proj.weight`` -> ``self_attn.q_proj``."""
    inside = after_layer(tensor)
    return _NUMBER.sub("*", tensor if inside is None else inside).removesuffix(".weight")


@dataclass
class ModelComparison:
    """The sums of every compared tensor of two models (and a base), and the tensors left out."""

    a: str
    b: str
    base: str | None
    tensors: dict[str, Sums]
    skipped: dict[str, str]  # tensor -> why it was not compared
    tied: dict[str, str] = field(default_factory=dict)  # a head read as some model's embeddings -> whose

    def _grouped(self, key: Callable[[str], str]) -> dict[str, Sums]:
        groups: dict[str, Sums] = {}
        for name, sums in self.tensors.items():
            groups.setdefault(key(name), Sums()).add(sums)
        return groups

    def layers(self) -> dict[str, Sums]:
        """Per layer, in model order: "pre", the layers by number, "post"."""
        groups = self._grouped(layer_group)
        place = {"pre": (-1, 0), "post": (1, 0)}
        return {k: groups[k] for k in sorted(groups, key=lambda k: place.get(k) or (0, int(k)))}

    def modules(self) -> dict[str, Sums]:
        return dict(sorted(self._grouped(module_kind).items()))

    def total(self) -> Sums:
        out = Sums()
        for sums in self.tensors.values():
            out.add(sums)
        return out

    def as_dict(self) -> dict:
        """What ``--json`` writes: figures per tensor, per layer, per module kind and overall."""
        with_base = self.base is not None

        def groups(sums: dict[str, Sums]) -> dict[str, dict]:
            return {k: {"tensors": s.tensors, **s.figures(with_base)} for k, s in sums.items()}

        tensors = {n: {**s.figures(with_base), "layer": layer_group(n), "module": module_kind(n)}
                   for n, s in self.tensors.items()}
        return {"a": self.a, "b": self.b, "base": self.base, "tensors": tensors,
                "layers": groups(self.layers()), "modules": groups(self.modules()),
                "model": groups({"model": self.total()})["model"], "skipped": self.skipped,
                "tied": self.tied}


def compare_models(a: str | Path, b: str | Path, base: str | Path | None = None, *,
                   chunk_elements: int = CHUNK_ELEMENTS, cache_dir: str | None = None,
                   progress: bool = False) -> ModelComparison:
    """Statistics of model ``b`` against model ``a`` (and the task vectors from ``base``).
    Models are references as a plan takes them: directories, ``org/name[@revision]``, ``X+adapter``."""
    refs = [resolve_model(str(r), cache_dir) for r in (a, b, *([base] if base is not None else []))]
    opened = open_checkpoints(refs)
    try:
        stats = compare_checkpoints(opened[0], opened[1], opened[2] if base is not None else None,
                                    chunk_elements=chunk_elements, progress=progress)
        # named as given: an adapted model's path is its base's
        return replace(stats, a=str(a), b=str(b), base=None if base is None else str(base))
    finally:
        for c in opened:
            c.close()


def compare_checkpoints(a: Opened, b: Opened, base: Opened | None = None, *,
                        chunk_elements: int = CHUNK_ELEMENTS, progress: bool = False) -> ModelComparison:
    """As ``compare_models``, over checkpoints already open."""
    models = [a, b, *([base] if base is not None else [])]
    read, skipped = _plan(models)
    total = sum(math.prod(m.tensors[n].shape) * m.tensors[n].dtype.itemsize
                for own in read.values() for m, n in zip(models, own))
    tensors: dict[str, Sums] = {}
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="statistics",
              disable=not progress, leave=False) as bar:
        for name, own in read.items():
            sums = Sums(tensors=1)
            for chunks in _chunks(models, own, chunk_elements):
                sums.add(_chunk_sums(*chunks))
                bar.update(sum(c.numel() * c.element_size() for c in chunks))
            for m, n in zip(models, own):
                m.release(n)
            tensors[name] = sums
    tied = {name: ", ".join(f"{label}'s {n}" for label, n in zip(_LABELS, own) if n != name) + " (tied)"
            for name, own in read.items() if any(n != name for n in own)}
    return ModelComparison(str(a.path), str(b.path), None if base is None else str(base.path), tensors,
                           skipped, tied)


_LABELS = ("a", "b", "base")


def _plan(models: list[Opened]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Each tensor compared, with the tensor read from each model (a head a model ties to its
    embeddings is read as the embeddings, as a merge reads it); and the tensors not compared, with
    why: missing from a model, or of another shape there."""
    read: dict[str, list[str]] = {}
    skipped: dict[str, str] = {}
    for name in dict.fromkeys(n for m in models for n in m.tensors):
        own = [name if name in m.tensors else tied_partner(name, m.tensors) for m in models]
        missing = [label for label, n in zip(_LABELS, own) if n is None]
        if missing:
            skipped[name] = f"not in {' and '.join(missing)}"
            continue
        shapes = [tuple(m.tensors[n].shape) for m, n in zip(models, own)]
        if len(set(shapes)) > 1:
            skipped[name] = "shapes differ: " + ", ".join(f"{list(sh)} in {label}"
                                                          for sh, label in zip(shapes, _LABELS))
        else:
            read[name] = own
    return read, skipped


def _chunks(models: list[Opened], names: list[str], chunk_elements: int) -> Iterator[list[torch.Tensor]]:
    """Tensor ``names[k]`` of model k, for every model, a row range at a time."""
    shape = models[0].tensors[names[0]].shape
    if not shape:
        yield [m.read(n) for m, n in zip(models, names)]
        return
    rows = max(1, chunk_elements // max(1, math.prod(shape[1:])))
    for start in range(0, shape[0], rows):
        yield [m.read(n, slice(start, min(start + rows, shape[0]))) for m, n in zip(models, names)]


def _chunk_sums(a: torch.Tensor, b: torch.Tensor, base: torch.Tensor | None = None) -> Sums:
    a, b = a.to(torch.float64).flatten(), b.to(torch.float64).flatten()
    d = a - b
    sums = Sums(0, a.numel(), float(a.dot(a)), float(b.dot(b)), float(a.dot(b)), float(d.dot(d)))
    del d
    if base is not None:  # not in place: a float64 read may be a shared base's kept chunk
        base = base.to(torch.float64).flatten()
        ta, tb = a - base, b - base
        sums.task_aa, sums.task_bb, sums.task_ab = float(ta.dot(ta)), float(tb.dot(tb)), float(ta.dot(tb))
        # opposite signs, both non-zero: exact unless |a·b| underflows float64 (below 4.9e-324, which
        # takes entries near 1e-162: only float64 inputs hold them); cheaper than sign products
        sums.conflicts = int(torch.count_nonzero(ta.mul_(tb) < 0))
    return sums


_COLUMNS = ("tensors", "l2_diff", "rel_change", "cosine")
_BASE_COLUMNS = ("task_cosine", "sign_disagreement")


def summary_table(stats: ModelComparison) -> str:
    """Per layer, per module kind and overall: one aligned table each, figures to 6 digits."""
    with_base = stats.base is not None
    head = _COLUMNS + (_BASE_COLUMNS if with_base else ())

    def block(title: str, groups: dict[str, Sums]) -> str:
        rows = []
        for key, sums in groups.items():
            figures = sums.figures(with_base)
            rows.append((key, str(sums.tensors), *(_cell(figures[c]) for c in head[1:])))
        return aligned_table((title, *head), rows)

    return "\n\n".join([block("layer", stats.layers()), block("module", stats.modules()),
                         block("all", {"model": stats.total()})])


def _cell(value: float | int | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def write_json(stats: ModelComparison, path: str | Path) -> None:
    try:
        Path(path).write_text(json.dumps(stats.as_dict(), indent=2) + "\n")
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror})") from None


def draw_layers(stats: ModelComparison, path: str | Path) -> None:
    """Per decoder layer: the relative change, and the cosines (and the sign disagreement)."""
    require_matplotlib(f"the chart {path}")
    figure = agg_figure(figsize=(7.0, 6.0), layout="constrained")
    assert figure is not None
    from matplotlib.ticker import MaxNLocator
    with_base = stats.base is not None
    layers = {int(k): s.figures(with_base) for k, s in stats.layers().items() if k.isdigit()}
    xs = sorted(layers)

    def series(key: str) -> list[float]:
        return [math.nan if layers[x][key] is None else layers[x][key] for x in xs]

    change, angle = figure.subplots(2, 1, sharex=True)
    change.plot(xs, series("rel_change"), marker="o", label="rel_change ‖A−B‖/‖A‖")
    change.set_ylabel("relative change")
    angle.plot(xs, series("cosine"), marker="o", label="cosine(A, B)")
    if with_base:
        angle.plot(xs, series("task_cosine"), marker="s", label="cosine of task vectors")
        angle.plot(xs, series("sign_disagreement"), marker="^", label="sign disagreement")
    angle.set_xlabel("layer")
    angle.xaxis.set_major_locator(MaxNLocator(integer=True))
    angle.set_ylabel("cosine / fraction")
    for axes in (change, angle):
        axes.legend(fontsize=8)
        axes.grid(alpha=0.3)
    change.set_title(f"{Path(stats.b).name} against {Path(stats.a).name}", fontsize=10)
    try:
        figure.savefig(path, dpi=120)
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror})") from None


def output_statistics(output: str | Path, inputs: list[str], *, chunk_elements: int = CHUNK_ELEMENTS,
                      progress: bool = False) -> dict[str, ModelComparison]:
    """A merged model against each of its ``inputs``: each input as A, the output as B (so
    ``rel_change`` is the output's change relative to that input), keyed by input."""
    output = Path(output)
    if (output / "adapter_config.json").is_file():
        raise OutputError(f"{output}: holds an adapter (adapter_output), not a model: statistics compare "
                          "merged models with their inputs")
    return {ref: compare_models(ref, output, chunk_elements=chunk_elements, progress=progress)
            for ref in inputs}


def write_merge_stats(output: str | Path, against: dict[str, ModelComparison]) -> Path:
    """``output/merge_stats.json``: ``{"output", "inputs": {input: as --json writes it}}``."""
    path = Path(output) / STATS_NAME
    document = {"output": str(output), "inputs": {ref: st.as_dict() for ref, st in against.items()}}
    try:
        path.write_text(json.dumps(document, indent=2) + "\n")
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror})") from None
    return path
