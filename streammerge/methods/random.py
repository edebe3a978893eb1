"""Counter-based random numbers: the i-th draw of a stream is hash(key, i).

A mask drawn this way depends only on (seed, tensor name, model id, element index), never on the
chunk size, the order tensors are processed in, or the device. Each draw is murmur3's 32-bit
finalizer on a Weyl sequence, i·φ + key mod 2³², in wrapping int32 arithmetic: 32-bit lanes
cost a sixth of the 64-bit mixer they replace (2.4 against 14.3 ns a draw, one thread), and a
DARE merge draws one number per weight per model twice. The key is per 2³² elements, so
streams longer than that do not repeat.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch

from streammerge.methods import compiled, float_bits

_SPAN = 1 << 32
_UNIT = 1 << 24  # a uniform is the top 24 bits of a draw, exact in float32
# Draws hashed at once on a CPU: of pieces of 2¹⁷ to 2²⁰, 2¹⁸ and 2¹⁹ were fastest (2.4–2.5 ns a draw, one thread).
_CPU_PIECE = 1 << 19


def _int32(x: int) -> int:
    x %= _SPAN
    return x - _SPAN if x >= 1 << 31 else x


_PHI = _int32(0x9E3779B9)
_M1 = _int32(0x85EBCA6B)
_M2 = _int32(0xC2B2AE35)


def _xor_shr(x: torch.Tensor, s: int, tmp: torch.Tensor) -> None:
    """x ^= x >>> s (logical shift of int32: torch's >> is arithmetic), with ``tmp`` as scratch."""
    torch.bitwise_right_shift(x, s, out=tmp).bitwise_and_((1 << (32 - s)) - 1)
    x.bitwise_xor_(tmp)


def _weyl(n: int, device: torch.device) -> torch.Tensor:
    """(j − 2³¹)·φ for j < n, which is j·φ + 2³¹ mod 2³² (φ is odd): offset so that arange stays in
    int32's range. On a CPU a slice of one cached piece, so a piece's counters cost one add, not three ops."""
    return _cpu_weyl()[:n] if device.type == "cpu" and n <= _CPU_PIECE else _fresh_weyl(n, device)


def _fresh_weyl(n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(-(1 << 31), n - (1 << 31), dtype=torch.int32, device=device).mul_(_PHI)


@functools.cache
def _cpu_weyl() -> torch.Tensor:
    return _fresh_weyl(_CPU_PIECE, torch.device("cpu"))


def _piece_size(count: int, device: torch.device) -> int:
    """The most draws hashed at once: on a CPU a cache-sized piece, elsewhere all of them."""
    return min(count, _CPU_PIECE) if device.type == "cpu" else count


def _start(key: int, first: int) -> int:
    """The first draw's counter, first·φ + key mod 2³², as the compiled loops take it."""
    return (first * 0x9E3779B9 + key) % _SPAN


@dataclass(frozen=True)
class Stream:
    """The draws of one (seed, tensor, model): ``bits``, ``uniform`` and ``below`` over element ranges."""

    seed: int
    tensor: str
    model_id: int

    def _key(self, block: int) -> int:
        digest = hashlib.blake2b(f"{self.seed}\0{self.tensor}\0{self.model_id}\0{block}".encode(), digest_size=4).digest()
        return int.from_bytes(digest, "little")

    def _pieces(self, start: int, count: int, step: int) -> Iterator[tuple[int, int, int, int]]:
        """(key, first counter, length, offset in the output) of each piece hashed at once: within one
        key block and at most ``step`` long."""
        at, end = start, start + count
        while at < end:
            block = at // _SPAN
            n = min(end, (block + 1) * _SPAN, at + step) - at
            yield self._key(block), at - block * _SPAN, n, at - start
            at += n

    def _hash(self, x: torch.Tensor, key: int, first: int, tmp: torch.Tensor) -> None:
        """Fill int32 ``x`` with the draws of counters first, first + 1, … under ``key``."""
        # (first + j)·φ + key = (j·φ + 2³¹) + (first·φ + key − 2³¹)
        torch.add(_weyl(len(x), x.device), _int32(first * _PHI + key - (1 << 31)), out=x)
        _xor_shr(x, 16, tmp)
        x.mul_(_M1)
        _xor_shr(x, 13, tmp)
        x.mul_(_M2)
        _xor_shr(x, 16, tmp)

    def runs(self, start: int, count: int) -> list[tuple[int, int]]:
        """(offset, first counter) of each run of elements ``start .. start + count - 1`` within one
        key block, as a compiled loop takes them: element offset + j draws from counter + j·φ."""
        return [(at, _start(key, first)) for key, first, _, at in self._pieces(start, count, count)]

    def bits(self, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """int32 draws for element indices ``start .. start + count - 1``."""
        device = torch.device(device)
        out = torch.empty(count, dtype=torch.int32, device=device)
        tmp = torch.empty(_piece_size(count, device), dtype=torch.int32, device=device)
        for key, first, n, at in self._pieces(start, count, _piece_size(count, device)):
            self._hash(out[at : at + n], key, first, tmp[:n])
        return out

    def uniform(self, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """float32 uniforms u = (draw >> 8) / 2²⁴ in [0, 1), exact multiples of 2⁻²⁴."""
        x = self.bits(start, count, device)
        return (x >> 8).bitwise_and_((1 << 24) - 1).to(torch.float32).mul_(1 / _UNIT)

    def below(self, p: float, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The mask ``uniform(...) < p``, compared exactly (not after rounding p to float32), in
        integers: (draw >> 8) < ⌈p·2²⁴⌉ ⟺ draw < ⌈p·2²⁴⌉·2⁸ as unsigned, i.e. with the sign bit flipped."""
        device = torch.device(device)
        limit = math.ceil(p * _UNIT)
        if limit <= 0 or limit >= _UNIT:
            return torch.full((count,), limit > 0, dtype=torch.bool, device=device)
        out = torch.empty(count, dtype=torch.bool, device=device)
        if device.type == "cpu" and compiled.unavailable() is None:  # the same draws, in one compiled loop
            for key, first, n, at in self._pieces(start, count, _piece_size(count, device)):
                compiled.stream_below(_start(key, first), limit * 256, out[at : at + n])
            return out
        size = _piece_size(count, device)
        x, tmp = torch.empty(size, dtype=torch.int32, device=device), torch.empty(size, dtype=torch.int32, device=device)
        for key, first, n, at in self._pieces(start, count, _piece_size(count, device)):
            self._hash(x[:n], key, first, tmp[:n])
            float_bits.compare(torch.lt, x[:n].bitwise_xor_(-(1 << 31)), limit * 256 - (1 << 31), out[at : at + n])
        return out

    def below_each(self, p: torch.Tensor, start: int) -> torch.Tensor:
        """The mask ``uniform(start, p.numel()) < p`` for float64 ``p``, elementwise (flat)."""
        p = p.reshape(-1)
        if p.device.type != "cpu" or compiled.unavailable() is not None:
            return self.uniform(start, p.numel(), p.device) < p
        out = torch.empty(p.numel(), dtype=torch.bool, device=p.device)
        for key, first, n, at in self._pieces(start, p.numel(), _piece_size(p.numel(), p.device)):
            compiled.stream_uniform_below(_start(key, first), p[at : at + n], out[at : at + n])
        return out
