"""Evaluate a plan parameter for one tensor, as mergekit does.

A gradient (list of numbers) is interpolated piecewise-linearly at position t = i / (n − 1) for
layer i of n; tensors outside the layers (embeddings, final norm, lm_head) sit at t = 0. A list of
``{filter, value}`` conditionals takes the first entry whose filter is a substring of the tensor
name (no filter, or "*", matches everything).
"""

from __future__ import annotations

from typing import Any

from streammerge.plan.schema import Conditional


def gradient_position(layer: int | None, num_layers: int) -> float:
    """Position of a slice's ``layer``-th layer (0-based) among its ``num_layers``; None (pre/post
    tensors) sits at 0 and a one-layer slice at 1, as in mergekit."""
    if layer is None:
        return 0.0
    return 1.0 if num_layers <= 1 else layer / (num_layers - 1)


def _interpolate(values: list[float], t: float) -> float:
    if len(values) == 1:
        return float(values[0])
    x = t * (len(values) - 1)
    i = min(int(x), len(values) - 2)
    frac = x - i
    return float(values[i]) * (1 - frac) + float(values[i + 1]) * frac


def evaluate(value: Any, tensor: str, t: float) -> Any:
    """The value a parameter takes for ``tensor`` at gradient position ``t`` (None: no match)."""
    if isinstance(value, list) and value and isinstance(value[0], Conditional):
        for cond in value:
            if cond.filter in (None, "*") or cond.filter in tensor:
                return evaluate(cond.value, tensor, t)
        return None
    if isinstance(value, list):
        return _interpolate(value, t)
    return value
