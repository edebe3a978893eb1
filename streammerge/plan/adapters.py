"""The native ``adapters:`` list: LoRA adapters folded into ``base_model``, written as the models
they stand for (``base_model+adapter``, mergekit's syntax), weighted, merged by ``merge_method``
(default ``task_arithmetic``: W + Σ w_i ΔW_i)."""

from __future__ import annotations

from typing import Annotated, Any

import pydantic
from pydantic import Field, TypeAdapter

from streammerge.errors import PlanError
from streammerge.methods import get_method
from streammerge.plan.schema import AdapterEntry

_ENTRIES = TypeAdapter(Annotated[list[AdapterEntry], Field(min_length=1)])
DEFAULT_METHOD = "task_arithmetic"


def expand_adapters(data: dict[str, Any], where: str) -> dict[str, Any]:
    if "adapters" not in data:
        return data
    if "models" in data or "slices" in data:
        raise PlanError(f"{where}: give 'adapters:' or 'models:'/'slices:', not both (a model may be written 'base+adapter')")
    base = data.get("base_model")
    if not isinstance(base, str):
        raise PlanError(f"{where}: adapters: adapters are folded into base_model; set 'base_model'")
    try:
        entries = _ENTRIES.validate_python(data["adapters"])
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise PlanError(f"{where}: adapters{'[' + loc.replace('.', '].', 1) if loc else ''}: {err['msg']} "
                        "(each entry is {path, weight, parameters})") from None
    method = data.get("merge_method", DEFAULT_METHOD)
    spec = get_method(method) if isinstance(method, str) else None
    if spec is not None and spec.base == "model":
        raise PlanError(f"{where}: adapters: {method} would count base_model as one more model; for a weighted sum of the "
                        "adapters use task_arithmetic (with parameters: {normalize: true} for a weighted average)")
    weighted = spec is not None and any(p.name == "weight" for p in spec.params)
    models = [{"model": f"{base}+{e.path}", "parameters": ({"weight": e.weight} if weighted else {}) | e.parameters} for e in entries]
    return {**{k: v for k, v in data.items() if k != "adapters"}, "merge_method": method, "models": models}
