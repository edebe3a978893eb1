"""Whether models can be merged, from their config.json and weight headers alone.

Each property (architecture, tensor names, shapes, dtypes, vocabulary, tied embeddings,
quantization) is compared across the models and graded as a merge of them would meet it:
``ok``; ``note`` (merges as it is, with a consequence worth knowing); ``needs`` (merges only with
the plan setting named); ``error`` (cannot be merged). The models can be merged when nothing is an
``error``. No tensor data is read: only headers, which is what makes this instant on any size.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from streammerge.cli_common import aligned_table
from streammerge.errors import PlanError
from streammerge.io.reader import Checkpoint, quantization
from streammerge.lora.reference import split_reference
from streammerge.plan.architecture import TIED_HEADS, is_vocab_tensor, tied_partner
from streammerge.plan.crimes import definition
from streammerge.plan.load import resolve_model

LEVELS = ("ok", "note", "needs", "error")
LISTED = 20  # differing tensors listed one per row; the rest are counted
_VOCAB_FIX = ("add a tokenizer block (e.g. tokenizer: {source: union}) or vocab_policy: truncate "
              "to the plan")


@dataclass(frozen=True)
class Finding:
    what: str  # the property, or the tensor it is about
    values: tuple[str, ...]  # one per model
    level: str  # one of LEVELS
    why: str = ""  # what a merge does about it, or the fix; empty when ok
    detail: bool = False  # a row about one tensor, under its property's row


@dataclass(frozen=True)
class CheckReport:
    models: tuple[str, ...]  # as given
    findings: tuple[Finding, ...]

    @property
    def mergeable(self) -> bool:
        return not any(f.level == "error" for f in self.findings)

    def verdict(self) -> str:
        errors = [f"{f.what}: {f.why}" for f in self.findings if f.level == "error" and not f.detail]
        if errors:
            return f"not mergeable: {'; '.join(errors)}"
        needs = [f.why for f in self.findings if f.level == "needs" and not f.detail]
        return f"mergeable with a plan setting: {'; '.join(dict.fromkeys(needs))}" if needs else "mergeable"

    def table(self) -> str:
        """The properties, one row each, a column per model and the grade; then a line per grade
        that is not ok, and the verdict."""
        head = ("", *self.models, "")
        rows = [(f.what, *f.values, f.level) for f in self.findings]
        lines = [aligned_table(head, rows), ""]
        lines += [f"{f.level}: {f.what}: {f.why}" for f in self.findings if f.level != "ok" and not f.detail]
        return "\n".join([*lines, f"verdict: {self.verdict()}"])


def check_models(refs: list[str], cache_dir: str | None = None) -> CheckReport:
    """Compare the models ``refs`` (directories or ``org/name[@revision]``) from headers alone."""
    if len(refs) < 2:
        raise PlanError(f"check compares models: got {len(refs)}, give two or more")
    opened: list[Checkpoint] = []
    try:
        for ref in refs:
            model, adapter = split_reference(ref)
            if adapter is not None:
                raise PlanError(f"{ref}: check reads model directories, not model+adapter; check the model "
                                f"{model} (an adapter never changes its names, shapes or dtypes)")
            opened.append(Checkpoint(resolve_model(ref, cache_dir), allow_quantized=True))
        return CheckReport(tuple(refs), tuple(_findings(opened)))
    finally:
        for c in opened:
            c.close()


def _findings(models: list[Checkpoint]) -> list[Finding]:
    configs = [m.config() for m in models]
    return [_architecture(configs), *_names(models), *_shapes(models), _dtypes(models),
            _vocabulary(models, configs), _tied(models, configs), _quantization(models, configs)]


def _same(values: list[str]) -> bool:
    return len(set(values)) == 1


def _architecture(configs: list[dict]) -> Finding:
    values = [", ".join(c.get("architectures") or []) or str(c.get("model_type", "-")) for c in configs]
    if _same(values):
        return Finding("architecture", tuple(values), "ok")
    known = [definition(c) for c in configs]
    if None not in known and not _same([str(k) for k in known]):
        return Finding("architecture", tuple(values), "error",
                       "mergekit refuses to mix architectures; allow_crimes: true in the plan "
                       "(--allow-crimes) merges them anyway where names and shapes match")
    if None in known:
        return Finding("architecture", tuple(values), "note", "mergekit has no definition for some of "
                       "them and does not compare them; the tensor names and shapes decide")
    return Finding("architecture", tuple(values), "note",
                   "named differently, but mergekit reads them with one definition")


def _is_tied_head(name: str, model: Checkpoint) -> bool:
    return name in TIED_HEADS and tied_partner(name, model.tensors) is not None


def _names(models: list[Checkpoint]) -> list[Finding]:
    counts = tuple(str(len(m.tensors)) for m in models)
    everywhere = set.intersection(*(set(m.tensors) for m in models))
    missing = [n for n in dict.fromkeys(n for m in models for n in m.tensors)
               if n not in everywhere and not all(n in m.tensors or _is_tied_head(n, m) for m in models)]
    if not missing:
        return [Finding("tensors", counts, "ok")]
    rows = [Finding("tensors", counts, "error", f"names not in every model: {len(missing)}")]
    rows += [Finding(n, tuple("present" if n in m.tensors else "missing" for m in models), "error",
                     "not in every model", detail=True) for n in missing[:LISTED]]
    return rows + _more(len(missing), len(models), "tensors are missing from some model")


def _more(count: int, width: int, what: str) -> list[Finding]:
    return ([] if count <= LISTED else
            [Finding(f"... {count - LISTED} more", ("",) * width, "error", what, detail=True)])


def _shapes(models: list[Checkpoint]) -> list[Finding]:
    common = [n for n in models[0].tensors if all(n in m.tensors for m in models)]
    differ = [n for n in common if not _same([str(m.tensors[n].shape) for m in models])]
    # a vocabulary matrix whose row counts alone differ is the vocabulary row's business
    rows_only = {n for n in differ
                 if is_vocab_tensor(n) and _same([str(m.tensors[n].shape[1:]) for m in models])}
    bad = [n for n in differ if n not in rows_only]
    parameters = tuple(f"{sum(math.prod(i.shape) for i in m.tensors.values()):,} parameters" for m in models)
    if not bad:
        return [Finding("shapes", parameters, "ok")]
    out = [Finding("shapes", parameters, "error", f"tensors whose shapes differ: {len(bad)}")]
    out += [Finding(f"shape {n}", tuple(str(list(m.tensors[n].shape)) for m in models), "error",
                    "shapes differ", detail=True) for n in bad[:LISTED]]
    return out + _more(len(bad), len(models), "tensor shapes differ")


def _dtypes(models: list[Checkpoint]) -> Finding:
    per_model = [Counter(str(i.dtype).removeprefix("torch.") for i in m.tensors.values()) for m in models]
    values = tuple(", ".join(d for d, _ in c.most_common()) for c in per_model)
    common = [n for n in models[0].tensors if all(n in m.tensors for m in models)]
    differ = sum(1 for n in common if not _same([str(m.tensors[n].dtype) for m in models]))
    if not differ:
        return Finding("dtypes", values, "ok")
    return Finding("dtypes", values, "note", f"tensors stored in different dtypes: {differ}; each is "
                   "read as stored and merged in the plan's dtype (dtype:, else the first model's)")


def _vocabulary(models: list[Checkpoint], configs: list[dict]) -> Finding:
    rows = []
    for m, c in zip(models, configs):
        matrices = [n for n in m.tensors if is_vocab_tensor(n) and m.tensors[n].shape]
        rows.append(sorted({m.tensors[n].shape[0] for n in matrices}))
    values = tuple(f"{c.get('vocab_size', '-')} ({'/'.join(map(str, r)) or 'no'} rows)"
                   for c, r in zip(configs, rows))
    if not _same([str(r) for r in rows]):
        return Finding("vocab_size", values, "needs", f"embedding rows differ: {_VOCAB_FIX}")
    if not _same([str(c.get("vocab_size")) for c in configs]):
        return Finding("vocab_size", values, "note",
                       "config.json vocab_size differs, the embedding rows agree")
    return Finding("vocab_size", values, "ok")


def _tied(models: list[Checkpoint], configs: list[dict]) -> Finding:
    def tied(m: Checkpoint, c: dict) -> bool:
        if isinstance(c.get("tie_word_embeddings"), bool):
            return c["tie_word_embeddings"]
        return any(_is_tied_head(h, m) and h not in m.tensors for h in TIED_HEADS)

    values = tuple("tied" if tied(m, c) else "untied" for m, c in zip(models, configs))
    if _same(list(values)):
        return Finding("tied embeddings", values, "ok")
    return Finding("tied embeddings", values, "note", "a tied model's embeddings stand in for its head; "
                   "the output keeps a head of its own (untied)")


def _quantization(models: list[Checkpoint], configs: list[dict]) -> Finding:
    found = [quantization(c, m.tensors) for m, c in zip(models, configs)]
    values = tuple("none" if q is None else _quant_kind(c.get("quantization_config"))
                   for q, c in zip(found, configs))
    quantized = [f"{m.path}: {q}" for m, q in zip(models, found) if q is not None]
    if not quantized:
        return Finding("quantization", values, "ok")
    return Finding("quantization", values, "error",
                   f"{'; '.join(quantized)}; merge the full-precision weights instead")


def _quant_kind(quant: object) -> str:
    if quant is None:
        return "quantized tensors"
    return str(quant.get("quant_method", "unknown")) if isinstance(quant, dict) else "unknown"
