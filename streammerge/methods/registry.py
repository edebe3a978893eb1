"""Merge methods registered by name; the engine looks them up here and nowhere else."""

from __future__ import annotations

from streammerge.errors import PlanError
from streammerge.methods.base import MergeMethod

_METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if method.name in _METHODS:
        raise ValueError(f"merge method {method.name!r} registered twice")
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    try:
        return _METHODS[name]
    except KeyError:
        raise PlanError(f"merge_method: unknown method {name!r} (available: {', '.join(sorted(_METHODS))})") from None


def method_names() -> list[str]:
    return sorted(_METHODS)
