"""Read and evaluate plan parameters as mergekit does.

A value is converted to its parameter's type as mergekit's schema converts it: pydantic's lax
mode, so a boolean takes 1/0, 1.0/0.0 and "true"/"yes"/"on"/"t"/"y"/"1" (and their negations, in
any case), a number takes a numeric string ("5e-1", as YAML reads it) or a boolean, and an integer
a float or string without a fraction; a named choice (``importance``) takes one of its names. A
gradient (list of values) is interpolated piecewise-linearly at position t = i / (n − 1) for layer
i of n — a list of booleans or names picks the value at int(t·(n − 1)) instead, and an
interpolated integer must come out whole; tensors outside the layers (embeddings, final norm,
lm_head) sit at t = 0. A list of ``{filter, value}`` conditionals takes the first entry whose
filter is a substring of the tensor name (no filter, or "*", matches everything); one
``{filter, value}`` is a list of one.
"""

from __future__ import annotations

from typing import Any

import pydantic

from streammerge.methods.base import Param
from streammerge.plan.schema import Conditional

_TYPES = {kind: pydantic.TypeAdapter(kind) for kind in (bool, int, float)}


def typed(spec: Param, value: Any) -> Any:
    """``value`` as a ``spec.kind``, converted as mergekit converts it; ValueError saying what is valid."""
    if spec.kind is str:
        if value not in spec.choices:
            raise ValueError(spec.expected())
        return value
    try:
        return _TYPES[spec.kind].validate_python(value)
    except pydantic.ValidationError:
        raise ValueError(spec.expected()) from None


def gradient_position(layer: int | None, num_layers: int) -> float:
    """Position of a slice's ``layer``-th layer (0-based) among its ``num_layers``; None (pre/post
    tensors) sits at 0 and a one-layer slice at 1, as in mergekit."""
    if layer is None:
        return 0.0
    return 1.0 if num_layers <= 1 else layer / (num_layers - 1)


def _interpolate(values: list[Any], t: float) -> Any:
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return values[int(t * (len(values) - 1))]  # booleans are picked, as mergekit picks them
    if len(values) == 1:
        return float(values[0])
    x = t * (len(values) - 1)
    i = min(int(x), len(values) - 2)
    frac = x - i
    return float(values[i]) * (1 - frac) + float(values[i + 1]) * frac


def evaluate(value: Any, tensor: str, t: float) -> Any:
    """The value a parameter takes for ``tensor`` at gradient position ``t`` (None: no match)."""
    if isinstance(value, Conditional):
        value = [value]
    if isinstance(value, list) and value and isinstance(value[0], Conditional):
        for cond in value:
            if cond.filter in (None, "*") or cond.filter in tensor:
                return evaluate(cond.value, tensor, t)
        return None
    if isinstance(value, list):
        return _interpolate(value, t) if value else None
    return value
