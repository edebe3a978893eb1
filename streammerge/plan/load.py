"""Read a plan from YAML (or a dict), validate it once, and resolve model paths.

mergekit ignores keys it does not know and published configs rely on it (a ``name:`` per model, a
stray top-level ``normalize``, parameters a method does not define), so a mergekit config gets one
warning per such key. Under ``strict`` — the default for native plans, which use a streammerge key
such as ``output`` — they are errors.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pydantic
import yaml

from streammerge.errors import PlanError
from streammerge.io.hub import fetch, is_hub_reference
from streammerge.methods import get_method
from streammerge.lora.combine import check_combination
from streammerge.lora.reference import resolve_adapter, split_reference
from streammerge.methods.base import MergeMethod, Param
from streammerge.plan.adapters import expand_adapters
from streammerge.plan.parameters import typed
from streammerge.plan.schema import (NATIVE_KEYS, Calibration, Conditional, MergePlan, ModelEntry, ModelToken,
                                     Module, OutputSlice, SliceSource, TokenSpec)
from streammerge.tokenizer.chat_template import check_chat_template


class PlanWarning(UserWarning):
    """Something in the plan has no effect."""


def read_documents(path: Path) -> list[Any]:
    """The YAML documents of a plan file (several for a mergekit-multi file)."""
    try:
        return list(yaml.safe_load_all(path.read_text()))
    except FileNotFoundError:
        raise PlanError(f"{path}: plan file not found") from None
    except yaml.YAMLError as e:
        raise PlanError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None


def load_plan(source: str | Path | dict[str, Any] | MergePlan, strict: bool | None = None, cache_dir: str | None = None,
              *, root: Path | None = None, where: str = "plan") -> MergePlan:
    """A validated ``MergePlan`` from a YAML path, a dict or a plan; raises ``PlanError``.

    Relative model paths are tried from the current directory, then from ``root`` (the plan
    file's directory). Model references that are not local directories but look like
    ``org/name[@revision]`` are fetched from the Hugging Face Hub into ``cache_dir`` (or the
    plan's, or huggingface_hub's).
    """
    if isinstance(source, MergePlan):
        return source
    root = root or Path.cwd()
    if isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        where, root = str(path), path.parent
        documents = read_documents(path)
        if len(documents) > 1:
            raise PlanError(f"{path}: holds {len(documents)} documents (a mergekit-multi file): run it with streammerge run")
        data = documents[0] if documents else None
    if not isinstance(data, dict):
        raise PlanError(f"{where}: a plan is a YAML mapping with at least 'merge_method' and 'models', 'slices' or 'modules'")
    if strict is None:
        strict = any(k in data for k in NATIVE_KEYS)
    data = expand_adapters(data, where)
    method = get_method(data["merge_method"]) if isinstance(data.get("merge_method"), str) else None
    data = _Cleaner(where, strict, method).plan(data)
    try:
        plan = MergePlan.model_validate(data)
    except pydantic.ValidationError as e:
        raise PlanError(f"{where}: {describe_error(e)}") from None
    method = get_method(plan.merge_method)
    _check_parameters(plan, method, where)
    if plan.chat_template is not None:
        problem = check_chat_template(plan.chat_template)
        if problem:
            raise PlanError(f"{where}: chat_template: {problem}")
    if plan.adapter_output is not None:
        check_combination(method, plan.adapter_output)
        ranked = [leaf for _, params, _ in _sections(plan)
                  for leaf in _leaves(params.get("importance", "magnitude")) if leaf != "magnitude"]
        if ranked:
            raise PlanError(f"{where}: importance: {ranked[0]!r} ranks with calibration statistics, which "
                            "adapter_output does not read (it merges the adapters' factors): use importance: "
                            "magnitude, or drop adapter_output")
        clamped = [key for _, params, _ in _sections(plan) for key in ("clamp_min", "clamp_max")
                   if any(leaf is not None for leaf in _leaves(params.get(key)))]
        if clamped and plan.adapter_output.combination == "cat":
            raise PlanError(f"{where}: {clamped[0]} bounds each element of the merged task vector, which "
                            "stacked factors (adapter_output combination: cat) cannot: use combination: svd "
                            f"with a rank, or drop {clamped[0]}")
    return _resolve_paths(plan, root, where, cache_dir or plan.cache_dir)


class _Cleaner:
    """Drops (with a warning) or refuses (when strict) keys that mean nothing, and converts
    parameter values to their parameters' types, as mergekit's schema does."""

    def __init__(self, where: str, strict: bool, method: MergeMethod | None):
        self.where, self.strict, self.method = where, strict, method

    def _unknown(self, key: str, what: str) -> None:
        message = f"{self.where}: {key}: {what}"
        if self.strict:
            raise PlanError(message)
        warnings.warn(f"{message}; it has no effect", PlanWarning, stacklevel=2)

    def _keys(self, data: Any, model: type[pydantic.BaseModel], at: str) -> Any:
        if not isinstance(data, dict):
            return data
        out = {}
        for k, v in data.items():
            if k in model.model_fields:
                out[k] = v
            else:
                self._unknown(f"{at}{k}", "unknown key")
        return out

    def _params(self, params: Any, at: str) -> Any:
        if params is None:  # `parameters:` with every entry commented out, as mergekit reads it
            return {}
        if not isinstance(params, dict) or self.method is None:
            return params
        known = {p.name: p for p in self.method.params}
        out = {}
        for name, value in params.items():
            if name in known:
                if isinstance(value, list):  # conditionals: keys besides filter/value mean nothing
                    value = [self._keys(v, Conditional, f"{at}{name}[{i}].") for i, v in enumerate(value)]
                out[name] = self._typed(known[name], value, f"{at}{name}")
            else:
                self._unknown(f"{at}{name}", f"{self.method.name} has no parameter {name!r} (valid: {', '.join(sorted(known)) or 'none'})")
        return out

    def _typed(self, spec: Param, value: Any, at: str) -> Any:
        """``value`` with each scalar (of a gradient, of a ``{filter, value}``) of ``spec``'s type."""
        if isinstance(value, list):
            return [self._typed(spec, v, at) for v in value]
        if isinstance(value, dict):  # a conditional; the schema checks the rest of its shape
            return {**value, "value": self._typed(spec, value["value"], at)} if "value" in value else value
        try:
            return typed(spec, value)
        except ValueError as e:
            raise PlanError(f"{self.where}: {at}: got {value!r}, expected {e}") from None

    def plan(self, data: dict) -> dict:
        data = self._merge(self._keys(data, MergePlan, ""), "")
        if isinstance(data.get("modules"), dict):
            data["modules"] = {name: self._merge(self._keys(m, Module, f"modules.{name}."), f"modules.{name}.")
                               for name, m in data["modules"].items()}
        return data

    def _merge(self, data: Any, at: str) -> Any:
        """``data``'s parameters, models and slices cleaned (the plan's, or a module's)."""
        if not isinstance(data, dict):
            return data
        if "parameters" in data:
            data["parameters"] = self._params(data["parameters"], f"{at}parameters.")
        if isinstance(data.get("models"), list):
            data["models"] = [self._entry(m, ModelEntry, f"{at}models[{i}].") for i, m in enumerate(data["models"])]
        if isinstance(data.get("slices"), list):
            slices = []
            for k, s in enumerate(data["slices"]):
                s = self._keys(s, OutputSlice, f"{at}slices[{k}].")
                if isinstance(s, dict):
                    if "parameters" in s:
                        s["parameters"] = self._params(s["parameters"], f"{at}slices[{k}].parameters.")
                    if isinstance(s.get("sources"), list):
                        s["sources"] = [self._entry(src, SliceSource, f"{at}slices[{k}].sources[{i}].") for i, src in enumerate(s["sources"])]
                slices.append(s)
            data["slices"] = slices
        return data

    def _entry(self, entry: Any, model: type[pydantic.BaseModel], at: str) -> Any:
        entry = self._keys(entry, model, at)
        if isinstance(entry, dict) and "parameters" in entry:
            entry["parameters"] = self._params(entry["parameters"], f"{at}parameters.")
        return entry


def describe_error(error: pydantic.ValidationError) -> str:
    """One line for a plan that does not validate: the key, what is wrong, the value."""
    err = error.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "literal", "union")))
    if err["type"] == "extra_forbidden":
        return f"unknown key '{loc}'"
    if err["type"] == "missing":
        return f"missing required key '{loc}'"
    msg = err["msg"].removeprefix("Value error, ")
    if not loc:
        return msg
    return f"key '{loc}': {msg} (got {err.get('input')!r})"


def _sections(plan: MergePlan | Module, at: str = "") -> list[tuple[str, dict, bool]]:
    """Every parameters mapping: (where, mapping, is it a model's own)."""
    out = [(f"{at}parameters", plan.parameters, False)]
    out += [(f"{at}models[{i}].parameters", m.parameters, True) for i, m in enumerate(plan.models or [])]
    for k, s in enumerate(plan.slices or []):
        out.append((f"{at}slices[{k}].parameters", s.parameters, False))
        out += [(f"{at}slices[{k}].sources[{i}].parameters", src.parameters, True) for i, src in enumerate(s.sources)]
    for name, module in (plan.modules or {}).items() if isinstance(plan, MergePlan) else ():
        out += _sections(module, f"modules.{name}.")
    return out


def _check_parameters(plan: MergePlan, method: MergeMethod, where: str) -> None:
    specs = {p.name: p for p in method.params}
    for section, params, own in _sections(plan):
        for name, value in params.items():
            spec = specs[name]
            if own and not spec.per_model:
                raise PlanError(f"{where}: {section}.{name}: {name!r} is a method-wide parameter; set it under top-level 'parameters'")
            for leaf in _leaves(value):
                problem = spec.check(leaf)
                if problem:
                    raise PlanError(f"{where}: {section}.{name}: got {leaf!r}, expected {problem}")


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, Conditional):
        return _leaves(value.value)
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v.value if isinstance(v, Conditional) else v)]
    return [value]


def resolve_model(ref: str, cache_dir: str | None = None, root: Path | None = None) -> str:
    """A model reference as a plan takes it (a directory, ``org/name[@revision]``, ``X+adapter``),
    as local directories: ``dir`` or ``dir+adapter_dir``. A relative path is tried from the
    current directory, then from ``root`` (the plan file's directory), as in a plan."""
    return _resolve(ref, root or Path.cwd(), "model", ref, cache_dir)


def _resolve(ref: str, root: Path, key: str, where: str, cache_dir: str | None) -> str:
    model, adapter = split_reference(ref)
    if adapter is not None:  # mergekit's `model+adapter`: a LoRA adapter folded into the model
        return f"{_resolve(model, root, key, where, cache_dir)}+{resolve_adapter(adapter, root, f'{key} (adapter)', where, cache_dir)}"
    path = Path(ref).expanduser()
    for candidate in (path, root / path) if not path.is_absolute() else (path,):
        if candidate.is_dir():
            return str(candidate.resolve())
    if is_hub_reference(ref):
        return str(fetch(ref, cache_dir))
    raise PlanError(f"{where}: {key}: model directory {ref!r} not found (relative paths are tried from the current directory, "
                    "then the plan's; 'org/name[@revision]' is fetched from the Hugging Face Hub)")


def _calibration(spec: Calibration | None, root: Path, where: str, at: str) -> Calibration | None:
    """``spec`` with its statistics directory, or its data when that is a local file, made absolute
    (relative paths are tried from the current directory, then from the plan's)."""
    if spec is None:
        return None
    ref = spec.stats if spec.stats is not None else spec.data
    path = Path(ref).expanduser()
    found = next((c for c in ((path,) if path.is_absolute() else (path, root / path)) if c.exists()), None)
    if spec.stats is not None:
        if found is None or not found.is_dir():
            raise PlanError(f"{where}: {at}.stats: statistics directory {ref!r} not found (write one with "
                            "streammerge calibrate MODEL --data FILE -o DIR, or give data: to measure)")
        return spec.model_copy(update={"stats": str(found.resolve())})
    if found is None:  # a dataset's name
        return spec
    return spec.model_copy(update={"data": str(found.resolve())})


def _resolve_paths(plan: MergePlan, root: Path, where: str, cache_dir: str | None) -> MergePlan:
    fetched: dict[str, str] = {}

    def calibration(spec: Calibration | None, at: str) -> Calibration | None:
        return _calibration(spec, root, where, at)

    def res(ref: str, key: str) -> str:
        if ref not in fetched:  # the same model named twice is fetched once
            fetched[ref] = _resolve(ref, root, key, where, cache_dir)
        return fetched[ref]

    def merged(m: MergePlan | Module, at: str) -> dict[str, Any]:
        update: dict[str, Any] = {}
        if m.models is not None:
            update["models"] = [e.model_copy(update={
                "model": res(e.model, f"{at}models[{i}].model"),
                "calibration": calibration(e.calibration, f"{at}models[{i}].calibration")})
                for i, e in enumerate(m.models)]
        if m.slices is not None:
            update["slices"] = [
                s.model_copy(update={
                    "sources": [src.model_copy(update={
                        "model": res(src.model, f"{at}slices[{k}].sources[{i}].model"),
                        "calibration": calibration(src.calibration,
                                                   f"{at}slices[{k}].sources[{i}].calibration")})
                        for i, src in enumerate(s.sources)],
                    "base_model": res(s.base_model, f"{at}slices[{k}].base_model") if s.base_model else None,
                })
                for k, s in enumerate(m.slices)
            ]
        return update

    def token(name: str, spec: TokenSpec) -> TokenSpec:
        at = f"tokenizer.tokens.{name}.source"
        if isinstance(spec.source, str):
            return spec.model_copy(update={"source": res(spec.source, at)})
        if isinstance(spec.source, ModelToken):
            return spec.model_copy(update={"source": spec.source.model_copy(update={"model": res(spec.source.model, f"{at}.model")})})
        return spec

    update = merged(plan, "")
    if plan.modules is not None:
        update["modules"] = {name: m.model_copy(update=merged(m, f"modules.{name}.")) for name, m in plan.modules.items()}
    if plan.base_model is not None:
        update["base_model"] = res(plan.base_model, "base_model")
    if plan.donor is not None:
        update["donor"] = res(plan.donor, "donor")
    if plan.tokenizer_source not in (None, "base", "union"):
        update["tokenizer_source"] = res(plan.tokenizer_source, "tokenizer_source")
    if plan.tokenizer is not None:
        source = plan.tokenizer.source
        update["tokenizer"] = plan.tokenizer.model_copy(update={
            "source": source if source in ("base", "union") else res(source, "tokenizer.source"),
            "tokens": {name: token(name, spec) for name, spec in plan.tokenizer.tokens.items()},
        })
    if plan.output is not None:
        update["output"] = str(Path(plan.output).expanduser().absolute())
    if plan.inputs is not None:
        update["inputs"] = {res(ref, f"inputs.{ref}"): record for ref, record in plan.inputs.items()}
    update["calibration"] = calibration(plan.calibration, "calibration")
    return plan.model_copy(update=update)
