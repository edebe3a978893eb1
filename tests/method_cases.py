"""A valid parameter set for every registered method, with variants that take its other code paths:
as the ``TensorParams`` a kernel gets, or as a plan over a family of checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from streammerge.methods import MergeMethod, TensorParams, get_method, method_names

_VALUES = {"weight": [0.6, 0.3, 0.5], "density": 0.5, "select_topk": 0.5, "t": 0.4}
_VARIANTS = {"nuslerp": [{}, {"nuslerp_flatten": False}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}],
             "model_stock": [{}, {"filter_wise": True}], "ties": [{}, {"rescale": True}],
             "slerp_eps": [{}, {"normalize": True}]}


def cases() -> list[tuple[str, dict]]:
    """(method name, parameters differing from the defaults) for every method and variant."""
    return [(name, extra) for name in method_names() for extra in _VARIANTS.get(name, [{}])]


def plan_cases() -> list[tuple[str, dict]]:
    """``cases()`` a plan can run without calibration data: not regmean or fisher, whose statistics
    every model must bring (tests/test_methods_data_aware.py merges those)."""
    return [(name, extra) for name, extra in cases() if not _needs_statistics(get_method(name), extra)]


def _needs_statistics(method: MergeMethod, extra: dict) -> bool:
    return method.statistics is not None and bool(method.statistics.kinds(tensor_params(method, extra)))


def model_count(method: MergeMethod) -> int:
    """Models merged besides the base: what the method allows, three where it may."""
    n = (method.models_exactly - (method.base == "required")) if method.models_exactly else max(method.min_models, 3)
    return n if method.max_models is None else min(n, method.max_models)


def _value(name: str, default: Any, i: int, extra: dict) -> Any:
    v = extra.get(name, _VALUES.get(name, default))
    return v[i] if isinstance(v, list) else v


def tensor_params(method: MergeMethod, extra: dict) -> TensorParams:
    globals_ = {p.name: _value(p.name, p.default, 0, extra) for p in method.params if not p.per_model}
    models = tuple({p.name: _value(p.name, p.default, i, extra) for p in method.params if p.per_model}
                   for i in range(model_count(method)))
    return TensorParams(globals_, models)


def plan(name: str, extra: dict, base: Path, models: list[Path], dtype: str) -> dict:
    """A plan merging ``models`` (as many as the method takes) onto ``base`` (when it takes one)."""
    method = get_method(name)
    params = tensor_params(method, extra)
    def given(values: Any) -> dict:  # a parameter without a value (clamp_min) is left out, not null
        return {k: v for k, v in values.items() if v is not None}

    out = {"merge_method": name, "dtype": dtype, "parameters": given(params.globals),
           "models": [{"model": str(m), "parameters": given(p)} for m, p in zip(models, params.models)]}
    return out if method.base == "model" else {**out, "base_model": str(base)}
