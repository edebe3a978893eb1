"""Counter-based uniform random numbers: u = hash(key, element index).

A mask drawn this way depends only on (seed, tensor name, model id, element index), never on the
chunk size, the order tensors are processed in, or the device. The mixer is murmur3's 64-bit
finalizer on a Weyl sequence, computed with wrapping int64 arithmetic.
"""

from __future__ import annotations

import hashlib

import torch


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_M1 = _signed(0xFF51AFD7ED558CCD)
_M2 = _signed(0xC4CEB9FE1A85EC53)


def stream_key(seed: int, tensor: str, model_id: int) -> int:
    digest = hashlib.blake2b(f"{seed}\0{tensor}\0{model_id}".encode(), digest_size=8).digest()
    return _signed(int.from_bytes(digest, "little"))


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def uniform(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 uniforms in [0, 1) for element indices ``start .. start + count - 1`` of stream ``key``."""
    x = torch.arange(start, start + count, dtype=torch.int64, device=device)
    x = x * _GOLDEN + key
    x ^= _shr(x, 33)
    x *= _M1
    x ^= _shr(x, 33)
    x *= _M2
    x ^= _shr(x, 33)
    return _shr(x, 40).to(torch.float32) * (1.0 / (1 << 24))
