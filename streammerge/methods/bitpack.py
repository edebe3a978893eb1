"""Boolean masks packed eight to a byte, so a statistics pass can hand its masks to the merge.

Packing is by planes, not by neighbours: bit j of byte r holds element j·n/8 + r. Each plane is a
contiguous eighth of the mask, so packing and unpacking are eight shifts over n/8 bytes each,
with no gather; a mask of n elements packs into n/8 bytes when n is a multiple of 8.
"""

from __future__ import annotations

import torch


def packable(n: int) -> bool:
    return n % 8 == 0


def pack(keep: torch.Tensor) -> torch.Tensor:
    """uint8[n/8] holding the bool mask ``keep`` (n elements, a multiple of 8)."""
    planes = keep.reshape(8, -1).view(torch.uint8)
    packed = planes[0].clone()
    shifted = torch.empty_like(packed)
    for j in range(1, 8):
        packed.bitwise_or_(torch.bitwise_left_shift(planes[j], j, out=shifted))
    return packed


def unpack(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The bool mask of ``shape`` that ``pack`` packed."""
    planes = torch.empty((8, len(packed)), dtype=torch.uint8, device=packed.device)
    for j in range(8):
        torch.bitwise_right_shift(packed, j, out=planes[j]).bitwise_and_(1)
    return planes.view(torch.bool).reshape(shape)
