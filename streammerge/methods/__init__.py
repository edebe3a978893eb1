"""Merge methods: pure functions over row chunks, registered by name."""

from streammerge.methods import linear, slerp, task_arithmetic  # noqa: F401  (registration)
from streammerge.methods.base import Chunk, MergeMethod, Param, StatPass, TensorParams
from streammerge.methods.registry import get_method, method_names

__all__ = ["Chunk", "MergeMethod", "Param", "StatPass", "TensorParams", "get_method", "method_names"]
