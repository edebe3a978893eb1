"""Boolean masks packed eight to a byte, so a statistics pass can hand its masks to the merge.

Packing is by planes, not by neighbours: bit j of byte r holds element j·n/8 + r. Each plane is a
contiguous eighth of the mask, so packing and unpacking are a broadcast shift over the eight
planes, with no gather; a mask of n elements packs into n/8 bytes when n is a multiple of 8.
"""

from __future__ import annotations

import torch


def packable(n: int) -> bool:
    return n % 8 == 0


def _shifts(device: torch.device) -> torch.Tensor:
    """Plane j's shift, j, as a column: one broadcast op shifts all eight planes."""
    return torch.arange(8, dtype=torch.uint8, device=device).reshape(8, 1)


def pack(keep: torch.Tensor) -> torch.Tensor:
    """uint8[n/8] holding the bool mask ``keep`` (n elements, a multiple of 8)."""
    planes = keep.reshape(8, -1).view(torch.uint8)
    return torch.bitwise_left_shift(planes, _shifts(keep.device)).sum(0, dtype=torch.uint8)  # disjoint bits: the sum is the or


def unpack(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The bool mask of ``shape`` that ``pack`` packed."""
    planes = torch.bitwise_right_shift(packed, _shifts(packed.device)).bitwise_and_(1)
    return planes.view(torch.bool).reshape(shape)
