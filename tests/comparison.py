"""Comparing a merge with mergekit's output: elements off by more than one rounding, the
statistics random methods are compared by, and mergekit 0.1.5's fused MoE names mapped back to
the per-expert tensors published checkpoints (and streammerge's outputs) hold."""

from __future__ import annotations

import math
import re

import pytest
import torch

ULP_BITS = {torch.bfloat16: 7, torch.float16: 10}


def differing(got: dict[str, torch.Tensor], gold: dict[str, torch.Tensor]) -> int:
    """Elements that differ by more than one unit in the last place of the golden value (bf16,
    fp16; 1e-6 floor for results that cancel to ~0) or by more than 1e-6 (float32)."""
    off = 0
    for name, g in gold.items():
        c = got[name]
        assert c.shape == g.shape and c.dtype == g.dtype, (name, c.shape, g.shape, c.dtype, g.dtype)
        diff = (c.double() - g.double()).abs()
        if g.dtype in ULP_BITS:
            exponent = torch.floor(torch.log2(g.double().abs().clamp_min(1e-30)))
            tol = torch.exp2(exponent - ULP_BITS[g.dtype]).clamp_min(1e-6)
        else:
            tol = torch.full_like(diff, 1e-6)
        off += int((diff > tol).sum())
    return off


def task_vector(tensors: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> torch.Tensor:
    names = [n for n in sorted(base) if n in tensors]
    return torch.cat([(tensors[n].double() - base[n].double()).reshape(-1) for n in names])


def statistics(got: dict[str, torch.Tensor], gold: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
               seed_cos: float) -> None:
    """A random merge against mergekit's draw: kept fraction within 0.01 (or three standard
    deviations of the difference of two independent draws' fractions, on small models),
    ‖task vector‖ within 2 %, cosine with mergekit's draw within 0.03 of ``seed_cos`` (the cosine
    two of mergekit's seeds give)."""
    tv, tg = task_vector(got, base), task_vector(gold, base)
    kept = (tg != 0).double().mean().item()
    spread = 3 * math.sqrt(2 * kept * (1 - kept) / tg.numel())
    assert abs((tv != 0).double().mean().item() - kept) < max(0.01, spread)
    assert tv.norm().item() == pytest.approx(tg.norm().item(), rel=0.02)
    cos = (tv @ tg / (tv.norm() * tg.norm())).item()
    assert abs(cos - seed_cos) < 0.03, cos


FUSED = re.compile(r"(.*\.)mlp\.experts\.(gate_up_proj|down_proj)$")
PER_EXPERT = {"mixtral": ("block_sparse_moe.", "w1", "w3", "w2"),
              "qwen": ("mlp.", "gate_proj", "up_proj", "down_proj")}


def per_expert(tensors: dict[str, torch.Tensor], names: set[str]) -> dict[str, torch.Tensor]:
    """``tensors`` with transformers v5's fused expert tensors (``mlp.experts.gate_up_proj``
    [E, 2I, H] = gate ‖ up, ``mlp.experts.down_proj`` [E, H, I]) and ``mlp.gate`` renamed to the
    published per-expert layout that ``names`` uses (Mixtral's ``block_sparse_moe.experts.E.w1/w3/w2``
    or Qwen-MoE's ``mlp.experts.E.gate_proj/up_proj/down_proj``)."""
    if not any(FUSED.match(n) for n in tensors):
        return tensors
    style = "mixtral" if any(".block_sparse_moe." in n for n in names) else "qwen"
    prefix, gate, up, down = PER_EXPERT[style]
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        m = FUSED.match(name)
        if m is None:
            out[name.replace(".mlp.gate.", f".{prefix}gate.")] = t
            continue
        layer = m.group(1) + prefix + "experts."
        for e in range(t.shape[0]):
            if m.group(2) == "down_proj":
                out[f"{layer}{e}.{down}.weight"] = t[e]
            else:
                half = t.shape[1] // 2
                out[f"{layer}{e}.{gate}.weight"], out[f"{layer}{e}.{up}.weight"] = t[e, :half], t[e, half:]
    return out
