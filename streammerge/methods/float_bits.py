"""Elementwise masks on the bits of floats.

A mask here is an integer tensor of the float's width holding all ones (keep) or zero, applied with
one bitwise and. On the CPU, ``torch.where``, ``masked_fill`` and bool-by-float products cost 5–10×
an integer op of the same size (measured on bfloat16: 3.5 ns an element against 0.2–0.4).
Comparisons, which must produce bools, write them as bytes (``compare``).
"""

from __future__ import annotations

from typing import Callable

import torch

_INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}


def compare(op: Callable[..., torch.Tensor], x: torch.Tensor, other: int | float, out: torch.Tensor | None = None) -> torch.Tensor:
    """``op(x, other)`` for a torch comparison such as ``torch.ge``, as bools (in ``out`` if given),
    stored through a uint8 view: on the CPU torch writes a compare's bytes 3–5x faster than its
    bools (measured on 1 M int16 and int32 keys: 0.11–0.13 against 0.4–0.6 ms)."""
    if out is None:
        out = torch.empty(x.shape, dtype=torch.bool, device=x.device)
    op(x, other, out=out.view(torch.uint8))
    return out


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(_INT[x.dtype])


def _width(x: torch.Tensor) -> int:
    return x.element_size() * 8


def mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The mask of a bool tensor, for floats of ``dtype``."""
    return keep.to(_INT[dtype]).neg_()


def select_(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x where the mask is set, else +0 (the values of ``torch.where(keep, x, 0)``), in place in x."""
    return bits(x).bitwise_and_(m).view(x.dtype)


def constant_(value: float, m: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``value`` (rounded to ``dtype``) where the mask is set, else +0, in place in m."""
    return m.bitwise_and_(bits(torch.tensor(value, dtype=dtype, device="cpu")).item()).view(dtype)


def nonzero(x: torch.Tensor) -> torch.Tensor:
    """Set where x is neither +0 nor −0: the magnitude bits plus their maximum carry into the sign
    bit exactly when they are not all zero (integer adds wrap), and the arithmetic shift spreads it."""
    top = (1 << (_width(x) - 1)) - 1
    return (bits(x) & top).add_(top).bitwise_right_shift_(_width(x) - 1)  # in place: 7x faster than a new int16


def agrees(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Set where x is neither +0 nor −0 and has y's sign bit: the sign bit of ~(x ^ y) says the
    signs agree, that of ``nonzero``'s sum says x ≠ ±0; one shift spreads both at once."""
    top = (1 << (_width(x) - 1)) - 1
    both = (bits(x) ^ bits(y)).bitwise_not_().bitwise_and_((bits(x) & top).add_(top))
    return both.bitwise_right_shift_(_width(x) - 1)


def where_zero(x: torch.Tensor, value: float) -> torch.Tensor:
    """x with every ±0 replaced by ``value``."""
    z = nonzero(x)
    return (bits(x) & z).bitwise_or_(constant_(value, z.bitwise_not(), x.dtype).view(z.dtype)).view(x.dtype)
