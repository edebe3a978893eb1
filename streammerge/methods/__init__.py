"""Merge methods: pure functions over row chunks, registered by name.

Every module in this package registers its methods on import; importing the package imports them all.
"""

import importlib
import pkgutil

from streammerge.methods.base import Chunk, MergeMethod, Param, StatPass, TensorParams, run_passes
from streammerge.methods.registry import get_method, method_names

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Chunk", "MergeMethod", "Param", "StatPass", "TensorParams", "get_method", "method_names", "run_passes"]
