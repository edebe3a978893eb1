"""The baseline: a merge the way notebook scripts do it, every model loaded whole into memory.

    python benchmarks/naive_merge.py METHOD OUT_FILE BASE FT1 FT2

loads every shard of every model with ``safetensors.torch.load_file``, merges tensor by tensor in
float32 and saves the whole merged state dict with ``save_file``. The maths follows the benchmark's
plans (weight 0.5, density 0.5, slerp t 0.5) closely enough to cost the same work; it is a cost
baseline, not a reference for values.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHT, DENSITY, T = 0.5, 0.5, 0.5


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def top_k_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    a = x.abs().flatten()
    threshold = a.kthvalue(a.numel() - k + 1).values
    return (a >= threshold).view_as(x)


def disjoint_mean(deltas: list[torch.Tensor]) -> torch.Tensor:
    weighted = torch.stack(deltas) * WEIGHT
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = weighted.sign() == elected
    divisor = (agree * WEIGHT).sum(0)
    divisor[divisor == 0] = 1
    return (weighted * agree).sum(0) / divisor


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    na, nb = a / a.norm().clamp_min(1e-8), b / b.norm().clamp_min(1e-8)
    theta = torch.arccos((na * nb).sum().clamp(-1, 1))
    if theta.abs() < 1e-4:
        return (1 - t) * a + t * b
    return (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)


def merge(method: str, base: torch.Tensor, fts: list[torch.Tensor], g: torch.Generator) -> torch.Tensor:
    deltas = [f - base for f in fts]
    if method == "linear":
        return (base + sum(fts)) / 3
    if method == "task_arithmetic":
        return base + WEIGHT * sum(deltas)
    if method == "ties":
        return base + disjoint_mean([d * top_k_mask(d, int(DENSITY * d.numel())) for d in deltas])
    if method == "dare_ties":
        return base + disjoint_mean([d * (torch.rand(d.shape, generator=g) < DENSITY) / DENSITY for d in deltas])
    if method == "slerp":
        return slerp(base, fts[0], T)
    raise SystemExit(f"unknown method {method}")


def main() -> None:
    method, out_file, *dirs = sys.argv[1:]
    base = load_dir(Path(dirs[0]))
    fts = [load_dir(Path(d)) for d in dirs[1:]]
    g = torch.Generator().manual_seed(0)
    merged = {name: merge(method, b.float(), [ft[name].float() for ft in fts], g).to(torch.bfloat16) for name, b in base.items()}
    save_file(merged, out_file, metadata={"format": "pt"})


if __name__ == "__main__":
    main()
