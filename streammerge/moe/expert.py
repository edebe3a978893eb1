"""An expert's MLP weight as mergekit-moe writes it: W + noise_scale·Z, and for down_proj times
residual_scale (``mergekit/moe/common.py``, ``noise_and_scale``), in the weight's stored dtype.

Z ~ N(0, 1) elementwise. mergekit draws it from torch's global generator, so no two runs agree;
here element k of tensor T of expert e is, by Box-Muller over two counter-based uniform streams
(``methods.random.Stream``),

    Z_k = sqrt(-2 ln(1 - u1_k)) · cos(2π u2_k),   u1 = U(seed, T, 2e), u2 = U(seed, T, 2e + 1)

so the bytes depend only on (seed, tensor, expert, element), never on how the tensor was chunked
or whether the run was resumed (Box & Muller, Ann. Math. Statist. 29(2), 1958).
"""

from __future__ import annotations

import math

import torch

from streammerge.methods.base import Chunk, MergeMethod, Stats, TensorParams
from streammerge.methods.random import Stream


def standard_normal(seed: int, tensor: str, expert: int, start: int, count: int) -> torch.Tensor:
    """float32 N(0, 1) draws for elements ``start .. start + count - 1`` of ``tensor``."""
    u1 = Stream(seed, tensor, 2 * expert).uniform(start, count)
    u2 = Stream(seed, tensor, 2 * expert + 1).uniform(start, count)
    # 1 - u1 is in (0, 1]: the logarithm is finite
    return torch.sqrt(-2.0 * torch.log1p(-u1)).mul_(torch.cos(u2.mul_(2 * math.pi)))


def _scaled(chunk: Chunk, stats: Stats) -> torch.Tensor:
    w = chunk.models[0]
    noise, residual = chunk.params.globals["noise_scale"], chunk.params.globals["residual_scale"]
    if noise is not None:
        z = standard_normal(
            chunk.seed, chunk.name, chunk.model_ids[0], chunk.element_start, w.numel()
        )
        w = w + z.view(w.shape).to(w.dtype) * noise  # randn_like(w) * noise_scale, in w's dtype
    if residual is not None:
        w = w * residual
    return w


EXPERT = MergeMethod(
    name="moe_expert",
    merge=_scaled,
    params=(),
    base="optional",
    precision="load",
    paper="mergekit-moe (Goddard et al., 2024, arXiv:2403.13257)",
    doc="One expert's weight with mergekit-moe's noise_scale and residual_scale applied.",
)


def expert_params(noise_scale: float | None, residual_scale: float | None) -> TensorParams:
    return TensorParams({"noise_scale": noise_scale, "residual_scale": residual_scale}, ({},))
