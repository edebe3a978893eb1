"""The task-arithmetic family: task_arithmetic, ties, dare_ties, dare_linear.

All share one recipe (mergekit's "generalized task arithmetic"), with B the base and x_i the models:

    δ_i = x_i − B                          task vectors
    δ̂_i = sparsify(δ_i)                    none | top-k magnitude (TIES) | random drop (DARE)
    D_i = w_i · δ̂_i
    mixed = Σ_i D_i                         or, with sign consensus (the *ties methods):
    mixed = Σ_i D_i·m_i,  m_i = [sign D_i = sign Σ_j D_j]   (a zero sum elects +1)
    mixed /= divisor  when normalize:  Σ_i w_i (or, with consensus, Σ_i w_i·m_i per element; 0 → 1)
    out = B + λ · mixed

computed in the working dtype, with the same operation order as mergekit so bf16 merges round the
same way.
"""

from __future__ import annotations

from typing import Callable

import torch

from streammerge.methods.base import Chunk, MergeMethod, Param, StatPass, Stats
from streammerge.methods.random import stream_key, uniform
from streammerge.methods.registry import register
from streammerge.methods.selection import top_k_mask, top_k_passes

_WEIGHT = Param("weight", float, required=True, per_model=True, doc="scale of the model's task vector")
_DENSITY = Param("density", float, default=1.0, per_model=True, low=0.0, high=1.0, low_open=True, doc="fraction of the task vector kept")
_LAMBDA = Param("lambda", float, default=1.0, doc="scale of the merged task vector")
_INT8_MASK = Param("int8_mask", bool, default=False, doc="accepted for mergekit compatibility; no effect")


def _normalize(default: bool) -> Param:
    return Param("normalize", bool, default=default, doc="divide by the summed weights (of agreeing models)")


def _rescale(default: bool) -> Param:
    return Param("rescale", bool, default=default, doc="scale survivors so each task vector keeps its L1 norm")


def task_vectors(chunk: Chunk, stats: Stats) -> list[torch.Tensor]:
    return [x - chunk.base for x in chunk.models]


def _keep_count(chunk: Chunk) -> list[int | None]:
    """TIES keeps k = int(density · numel) entries (at least one) of each task vector."""
    return [None if d >= 1 else max(1, int(d * chunk.numel)) for d in chunk.params.per_model("density")]


def _magnitude(chunk: Chunk, stats: Stats, deltas: list[torch.Tensor]) -> list[torch.Tensor]:
    return [d * top_k_mask(d, i, chunk, stats, "topk") for i, d in enumerate(deltas)]


def _dare_keep(chunk: Chunk, i: int, d: torch.Tensor) -> torch.Tensor:
    """Bernoulli(density) keep mask from the counter-based generator."""
    key = stream_key(chunk.seed, chunk.name, chunk.model_ids[i])
    u = uniform(key, chunk.element_start, d.numel(), d.device)
    return (u < chunk.params.models[i]["density"]).reshape(d.shape)


def _dare_l1_collect(chunk: Chunk, stats: Stats) -> dict[str, torch.Tensor]:
    if not chunk.params.globals["rescale"]:
        return {}
    full, kept = [], []
    for i, d in enumerate(task_vectors(chunk, stats)):
        a = d.abs().to(torch.float64).reshape(chunk.row_stop - chunk.row_start, -1)
        full.append(chunk.per_row(a.sum(1)))
        kept.append(chunk.per_row((a * _dare_keep(chunk, i, d).reshape(a.shape)).sum(1)))
    return {"full": torch.stack(full), "kept": torch.stack(kept)}


def _dare_l1_finish(totals: dict[str, torch.Tensor], chunk: Chunk, stats: Stats) -> Stats:
    if not totals:
        return stats
    scale = []
    for full, kept in zip(totals["full"].sum(1).tolist(), totals["kept"].sum(1).tolist()):
        scale.append(full / kept if full >= 1e-7 and kept >= 1e-7 else 1.0)
    return {**stats, "l1_scale": scale}


def _random(chunk: Chunk, stats: Stats, deltas: list[torch.Tensor]) -> list[torch.Tensor]:
    """DARE: drop each entry with probability 1 − density; with ``rescale``, multiply the survivors
    by ‖δ‖₁ / ‖δ̂‖₁ (mergekit's L1 rescale, equal to the paper's 1/density in expectation)."""
    out = []
    for i, d in enumerate(deltas):
        if chunk.params.models[i]["density"] >= 1:
            out.append(d)
            continue
        kept = d * _dare_keep(chunk, i, d)
        if "l1_scale" in stats and stats["l1_scale"][i] != 1.0:
            kept = kept * stats["l1_scale"][i]
        out.append(kept)
    return out


Sparsify = Callable[[Chunk, Stats, list[torch.Tensor]], list[torch.Tensor]]


def _gta(sparsify: Sparsify | None, consensus: bool) -> Callable[[Chunk, Stats], torch.Tensor]:
    def merge(chunk: Chunk, stats: Stats) -> torch.Tensor:
        base = chunk.base
        deltas = task_vectors(chunk, stats)
        if sparsify is not None:
            deltas = sparsify(chunk, stats, deltas)
        deltas = torch.stack(deltas)
        weights = torch.tensor(chunk.params.per_model("weight"), dtype=deltas.dtype).view(-1, *[1] * base.dim())
        weighted = deltas * weights
        if consensus:
            elected = (weighted.sum(0) >= 0).to(weighted.dtype) * 2 - 1
            agree = weighted.sign() == elected
            mixed = (weighted * agree).sum(0)
            divisor = (weights * agree).sum(0)
            divisor[divisor == 0] = 1
        else:
            mixed = weighted.sum(0)
            divisor = weights.sum(0)
            divisor[divisor.abs() < 1e-8] = 1
        if chunk.params.globals["normalize"]:
            mixed /= divisor
        if chunk.params.globals["lambda"] != 1:
            mixed *= chunk.params.globals["lambda"]
        return base + mixed

    return merge


def _register(name: str, paper: str, doc: str, sparsify: Sparsify | None, consensus: bool,
              passes: tuple[StatPass, ...], params: tuple[Param, ...]) -> None:
    register(MergeMethod(name=name, merge=_gta(sparsify, consensus), params=(_WEIGHT, *params, _LAMBDA, _INT8_MASK),
                         base="required", precision="load", paper=paper, passes=passes, doc=doc))


_TOPK = top_k_passes(task_vectors, _keep_count, "topk")
_L1 = (StatPass(_dare_l1_collect, _dare_l1_finish),)

_register("task_arithmetic", "arXiv:2212.04089", "base + λ Σ w_i δ_i (Ilharco et al., ICLR 2023)",
          None, False, (), (_normalize(False),))
_register("ties", "arXiv:2306.01708", "top-k magnitude trim, sign election by mass, disjoint mean (Yadav et al., NeurIPS 2023)",
          _magnitude, True, _TOPK, (_DENSITY, _normalize(True)))
_register("dare_ties", "arXiv:2311.03099", "random drop + L1 rescale, then TIES sign election (Yu et al., ICML 2024)",
          _random, True, _L1, (_DENSITY, _normalize(False), _rescale(True)))
_register("dare_linear", "arXiv:2311.03099", "random drop + L1 rescale, then a weighted sum (Yu et al., ICML 2024)",
          _random, False, _L1, (_DENSITY, _normalize(False), _rescale(True)))
