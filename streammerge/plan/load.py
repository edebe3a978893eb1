"""Read a plan from YAML (or a dict), validate it once, and resolve model paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydantic
import yaml

from streammerge.errors import PlanError
from streammerge.methods import get_method
from streammerge.methods.base import MergeMethod
from streammerge.plan.schema import Conditional, MergePlan


def load_plan(source: str | Path | dict[str, Any] | MergePlan) -> MergePlan:
    """A validated ``MergePlan`` from a YAML path, a dict or a plan; raises ``PlanError``."""
    if isinstance(source, MergePlan):
        return source
    where, root = "plan", Path.cwd()
    if isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        where, root = str(path), path.parent
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise PlanError(f"{path}: plan file not found") from None
        except yaml.YAMLError as e:
            raise PlanError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise PlanError(f"{where}: a plan is a YAML mapping with at least 'merge_method' and 'models'")
    for key in ("slices", "modules"):
        if key in data:
            raise PlanError(f"{where}: '{key}:' configs are not supported yet; use 'models:'")
    try:
        plan = MergePlan.model_validate(data)
    except pydantic.ValidationError as e:
        raise PlanError(f"{where}: {_describe(e)}") from None
    method = get_method(plan.merge_method)
    _check_parameters(plan, method, where)
    return _resolve_paths(plan, root, where)


def _describe(error: pydantic.ValidationError) -> str:
    err = error.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "literal", "union")))
    if err["type"] == "extra_forbidden":
        return f"unknown key '{loc}'"
    if err["type"] == "missing":
        return f"missing required key '{loc}'"
    value = err.get("input")
    msg = err["msg"].removeprefix("Value error, ")
    return f"key '{loc}': {msg} (got {value!r})"


def _check_parameters(plan: MergePlan, method: MergeMethod, where: str) -> None:
    specs = {p.name: p for p in method.params}
    valid = ", ".join(specs) or "none"
    sections = [("parameters", plan.parameters)] + [(f"models[{i}].parameters", m.parameters) for i, m in enumerate(plan.models)]
    for section, params in sections:
        for name, value in params.items():
            if name not in specs:
                raise PlanError(f"{where}: {section}.{name}: {method.name} has no parameter {name!r} (valid: {valid})")
            spec = specs[name]
            if not spec.per_model and section != "parameters":
                raise PlanError(f"{where}: {section}.{name}: {name!r} is a method-wide parameter; set it under top-level 'parameters'")
            for leaf in _leaves(value):
                problem = spec.check(leaf)
                if problem:
                    raise PlanError(f"{where}: {section}.{name}: got {leaf!r}, expected {problem}")


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v.value if isinstance(v, Conditional) else v)]
    return [value]


def _resolve(ref: str, root: Path, key: str, where: str) -> str:
    path = Path(ref).expanduser()
    for candidate in (path, root / path) if not path.is_absolute() else (path,):
        if candidate.is_dir():
            return str(candidate.resolve())
    raise PlanError(f"{where}: {key}: model directory {ref!r} not found (relative paths are tried from the current directory, then the plan's)")


def _resolve_paths(plan: MergePlan, root: Path, where: str) -> MergePlan:
    models = [m.model_copy(update={"model": _resolve(m.model, root, f"models[{i}].model", where)}) for i, m in enumerate(plan.models)]
    update: dict[str, Any] = {"models": models}
    if plan.base_model is not None:
        update["base_model"] = _resolve(plan.base_model, root, "base_model", where)
    if plan.tokenizer_source not in (None, "base"):
        if plan.tokenizer_source == "union":
            raise PlanError(f"{where}: tokenizer_source: 'union' is not supported yet; use 'base' or a model path")
        update["tokenizer_source"] = _resolve(plan.tokenizer_source, root, "tokenizer_source", where)
    if plan.output is not None:
        update["output"] = str(Path(plan.output).expanduser().absolute())
    return plan.model_copy(update=update)
