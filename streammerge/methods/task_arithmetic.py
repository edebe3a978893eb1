"""The task-arithmetic family: task_arithmetic, ties, dare_*, breadcrumbs*, della*.

All share one recipe (mergekit's "generalized task arithmetic"), with B the base and x_i the models:

    δ_i = x_i − B                          task vectors
    δ̂_i = m_i ⊙ δ_i                        keep mask m_i: all | top-k magnitude (TIES) | random (DARE) |
                                           magnitude band (breadcrumbs) | random by magnitude rank (DELLA)
    δ̂_i ·= ‖δ_i‖₁ / ‖δ̂_i‖₁  with rescale   (per tensor; skipped when either norm < 1e-7)
    D_i = w_i · δ̂_i
    mixed = Σ_i D_i                         or, with sign consensus (ties, *_ties, della):
    mixed = Σ_i D_i·c_i,  c_i = [sign D_i = sign Σ_j D_j]   (a zero sum elects +1)
    mixed /= divisor  when normalize:  Σ_i w_i (or, with consensus, Σ_i w_i·c_i per element; 0 → 1)
    out = B + λ · mixed                     (task_arithmetic's native clamp_min/clamp_max clamp λ · mixed
                                            elementwise first, bounding how far any weight moves)

computed in the working dtype, with the same operation order as mergekit so bf16 merges round the
same way. A model with density ≥ 1 keeps its whole task vector, as in mergekit. ties, breadcrumbs*
and della* rank entries by |δ|, or by an importance from calibration statistics
(``importance``: wanda, sparsegpt; ``streammerge.methods.importance``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch

from streammerge.methods import bitpack, compiled, float_bits, importance
from streammerge.methods.base import Chunk, MergeMethod, Param, StatPass, Stats, TensorParams
from streammerge.methods.random import Stream
from streammerge.methods.registry import register
from streammerge.methods.selection import top_k_mask, top_k_passes
from streammerge.methods.task_vectors import sign_agreement, sum_models, task_vectors

_WEIGHT = Param("weight", float, required=True, per_model=True, doc="scale of the model's task vector")
_DENSITY = Param("density", float, default=1.0, per_model=True, low=0.0, high=1.0, low_open=True, doc="fraction of the task vector kept")
_GAMMA = Param("gamma", float, default=0.01, per_model=True, low=0.0, high=1.0, doc="fraction of largest |δ| dropped as outliers")
_EPSILON = Param("epsilon", float, default=0.15, per_model=True, low=0.0, high=0.5, doc="keep probability spread: density ± epsilon by magnitude rank")
_LAMBDA = Param("lambda", float, default=1.0, doc="scale of the merged task vector")
_INT8_MASK = Param("int8_mask", bool, default=False, doc="accepted for mergekit compatibility; no effect")
# streammerge's own (mergekit has no clamp): bound how far any weight moves from the base.
_CLAMP = (Param("clamp_min", float, doc="lower bound on each element of λ Σ w_i δ_i (none by default)"),
          Param("clamp_max", float, doc="upper bound on each element of λ Σ w_i δ_i (none by default)"))

# The L1 pass hands its keep masks to the merge, packed, up to this many bytes a tensor: a DARE mask
# costs ~2.5 ns an element to draw and 0.4 to unpack. 64 MiB holds three models' masks of a
# 7B model's 131 M-element embedding; a tensor past that draws the masks of later models again.
MASK_CACHE_BYTES = 64 << 20

# (chunk, stats, model i, δ_i) → keep mask; a mask depends on |δ_i| alone, so |δ_i| may stand for δ_i
Keep = Callable[[Chunk, Stats, int, torch.Tensor], torch.Tensor]
# Model i's keep mask as the compiled kernel takes it, without δ_i, or None where only Keep can tell.
FusedKeep = Callable[[Chunk, Stats, int], compiled.Keep | None]
Sparsify = Callable[[Chunk, Stats, list[torch.Tensor]], list[torch.Tensor]]
Passes = Callable[[TensorParams], tuple[StatPass, ...]]


def _normalize(default: bool) -> Param:
    return Param("normalize", bool, default=default, doc="divide by the summed weights (of agreeing models)")


def _rescale(default: bool) -> Param:
    return Param("rescale", bool, default=default, doc="scale survivors so each task vector keeps its L1 norm")


def _whole(d: float) -> bool:
    return d >= 1


def _sparsifier(keep: Keep) -> Sparsify:
    """δ̂_i = m_i ⊙ δ_i, times the L1 rescale factor when a pass computed one."""

    def sparsify(chunk: Chunk, stats: Stats, deltas: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for i, d in enumerate(deltas):
            if _whole(chunk.params.models[i]["density"]):
                out.append(d)
                continue
            kept = float_bits.select_(d, float_bits.mask(_kept(chunk, stats, keep, i, d), d.dtype))
            if "l1_scale" in stats and stats["l1_scale"][i] != 1.0:
                kept.mul_(stats["l1_scale"][i])
            out.append(kept)
        return out

    return sparsify


def _row_sums(chunk: Chunk, a: torch.Tensor) -> torch.Tensor:
    """Row sums of a chunk-shaped tensor, scattered into a rows-long float64 vector (exact to add).

    Each row is summed in its own dtype: a row lies whole in one chunk, and torch sums it the same
    way whatever the chunk, so the totals do not depend on the chunking. (Summing in float64 made
    torch convert the whole chunk first, 24x slower, for digits the rescale does not need.)"""
    return chunk.per_row(a.reshape(chunk.row_stop - chunk.row_start, -1).sum(1).double())


def _packed_mask(chunk: Chunk, stats: Stats, i: int) -> torch.Tensor | None:
    """Model i's keep mask of this chunk as the L1 pass packed it, if it did."""
    packed = stats.get("packed_masks", {}).get(chunk.row_start, {}).get(i)
    return None if packed is None else bitpack.unpack(packed, chunk.base.shape)


def _kept(chunk: Chunk, stats: Stats, keep: Keep, i: int, d: torch.Tensor) -> torch.Tensor:
    """Model i's keep mask: as the L1 pass packed it, else computed."""
    packed = _packed_mask(chunk, stats, i)
    return keep(chunk, stats, i, d) if packed is None else packed


def _cached(chunk: Chunk, i: int, m: torch.Tensor) -> bool:
    """Whether the L1 pass keeps model i's mask ``m`` of this chunk for the merge."""
    return bitpack.packable(m.numel()) and (i + 1) * chunk.numel // 8 <= MASK_CACHE_BYTES


def _magnitudes(chunk: Chunk) -> list[torch.Tensor]:
    """|δ_i| for each model: compiled, a pass each, where it applies; else torch's sub and abs."""
    if compiled.supports(chunk.base):
        found = [compiled.abs_delta(chunk.base, x) for x in chunk.models]
        if all(a is not None for a in found):
            return found
    return [d.abs_() for d in task_vectors(chunk)]


def _l1_rows(
    chunk: Chunk, stats: Stats, keep: Keep, magnitudes: list[torch.Tensor], pack: bool = False
) -> dict:
    """‖δ_i‖₁ and ‖m_i ⊙ δ_i‖₁ per row, for ``_l1_finish``, from |δ_i| (which
    stands for δ_i in the keep masks: every one ranks by magnitude or ignores δ); with ``pack``,
    the masks too."""
    full, kept, packed = [], [], {}
    for i, a in enumerate(magnitudes):
        full.append(_row_sums(chunk, a))
        if _whole(chunk.params.models[i]["density"]):
            kept.append(full[-1])
            continue
        m = keep(chunk, stats, i, a)
        if pack and _cached(chunk, i, m):
            packed[i] = bitpack.pack(m)
        kept.append(_row_sums(chunk, float_bits.select_(a, float_bits.mask(m, a.dtype))))
    sums = {"full": torch.stack(full), "kept": torch.stack(kept)}
    return {**sums, "packed": packed, "row_start": chunk.row_start} if pack else sums


def _l1_pass(keep: Keep) -> StatPass:
    return StatPass(lambda chunk, stats: _l1_rows(chunk, stats, keep, _magnitudes(chunk), pack=True),
                    _l1_finish_packed, per_chunk=_PACKED)


_PACKED = frozenset({"packed", "row_start"})  # the L1 pass's partials kept per chunk


def _l1_finish_packed(totals: dict, chunk: Chunk, stats: Stats) -> Stats:
    """``_l1_finish``, and the keep masks the pass packed, by chunk."""
    masks = dict(zip(totals["row_start"], totals["packed"]))
    return {**_l1_finish(totals, chunk, stats), "packed_masks": masks}


def _l1_finish(totals: dict[str, torch.Tensor], chunk: Chunk, stats: Stats) -> Stats:
    """stats["l1_scale"][i] = ‖δ_i‖₁ / ‖m_i ⊙ δ_i‖₁, or 1 when either is below 1e-7 (as mergekit)."""
    scale = []
    for full, kept in zip(totals["full"].sum(1).tolist(), totals["kept"].sum(1).tolist()):
        scale.append(full / kept if full >= 1e-7 and kept >= 1e-7 else 1.0)
    return {**stats, "l1_scale": scale}


def _with_rescale(passes: tuple[StatPass, ...] | Passes, keep: Keep) -> Passes:
    """``passes``, then the L1 pass when ``rescale`` is on (no extra read when it is off)."""
    l1 = (_l1_pass(keep),)
    chosen = passes if callable(passes) else (lambda params: passes)
    return lambda params: chosen(params) + l1 if params.globals["rescale"] else chosen(params)


def _by_importance(magnitude: tuple[StatPass, ...], ranked: tuple[StatPass, ...]) -> Passes:
    """The selection passes over |δ|, or over importance scores when the plan ranks by them."""
    return lambda params: ranked if importance.ranked(params) else magnitude


def _scores(chunk: Chunk, stats: Stats) -> list[torch.Tensor]:
    """What each model's task vector is ranked by (``importance.score``)."""
    return [importance.score(chunk, i, d) for i, d in enumerate(task_vectors(chunk, stats))]


def _stream(chunk: Chunk, i: int) -> Stream:
    """Model i's counter-based draws for this tensor: one per (seed, tensor, model, element)."""
    return Stream(chunk.seed, chunk.name, chunk.model_ids[i])


def _bernoulli(chunk: Chunk, i: int, d: torch.Tensor, p: float | torch.Tensor) -> torch.Tensor:
    """Keep mask [u < p], u from model i's ``_stream``."""
    stream = _stream(chunk, i)
    if isinstance(p, float):
        return stream.below(p, chunk.element_start, d.numel(), d.device).reshape(d.shape)
    return stream.below_each(p.to(torch.float64), chunk.element_start).reshape(d.shape)


# --- TIES (Yadav et al., arXiv:2306.01708) -------------------------------------------------------

def _delta_histograms(chunk: Chunk, stats: Stats, wanted: list[bool]) -> list[torch.Tensor | None] | None:
    """TIES's first pass by ``compiled``, where it applies."""
    if not compiled.supports(chunk.base):
        return None
    return compiled.delta_histograms(chunk.base, chunk.models, wanted)


def _keep_count(chunk: Chunk, stats: Stats) -> list[int | None]:
    """TIES keeps k = int(density · numel) entries (at least one) of each task vector."""
    return [None if _whole(d) else max(1, int(d * chunk.numel)) for d in chunk.params.per_model("density")]


def _top_k_keep(chunk: Chunk, stats: Stats, i: int, d: torch.Tensor) -> torch.Tensor:
    return top_k_mask(importance.score(chunk, i, d), i, chunk, stats, "topk")


def _top_k_fused(chunk: Chunk, stats: Stats, i: int) -> compiled.Keep | None:
    """A magnitude threshold; the one chunk per tensor where the kept equal keys run out gets its
    mask from ``_top_k_keep``."""
    if importance.ranked(chunk.params):
        return None
    f = stats["topk"]["found"][i]
    remaining = f["keep_equal"] - f["equal_before"][chunk.row_start]
    if remaining >= f["equal_here"][chunk.row_start]:
        return compiled.Keep(compiled.KEEP_AT_LEAST, f["threshold"])
    if remaining <= 0:
        return compiled.Keep(compiled.KEEP_ABOVE, f["threshold"])
    d = chunk.models[i] - chunk.base
    return compiled.Keep(compiled.KEEP_MASKED, mask=_top_k_keep(chunk, stats, i, d))


# --- DARE: keep each entry with probability density (Yu et al., arXiv:2311.03099) ---------------

def _dare_keep(chunk: Chunk, stats: Stats, i: int, d: torch.Tensor) -> torch.Tensor:
    return _bernoulli(chunk, i, d, chunk.params.models[i]["density"])


def _dare_fused(chunk: Chunk, stats: Stats, i: int) -> compiled.Keep:
    """DARE's mask does not depend on δ: the base stands in for its shape."""
    return compiled.Keep(compiled.KEEP_MASKED, mask=_kept(chunk, stats, _dare_keep, i, chunk.base))


# --- Breadcrumbs (Davari & Belilovsky, arXiv:2312.06795) -----------------------------------------

def _band(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """(n_top, target): drop the n_top = int(γ·n) largest |δ| and keep the target = int(density·n)
    next largest (n_top shrinks when both do not fit). mergekit's ``magnitude_outliers``."""
    target = int(density * numel)
    return min(int(gamma * numel), numel - target), target


def _band_counts(chunk: Chunk, stats: Stats) -> list[int | None]:
    """Selection sizes for the doubled model list: n_top for each model, then n_top + target.
    0 and n need no selection (``None``); ``_band_keep`` reads 0 as "none" itself."""
    bands = [_band(chunk.numel, p["density"], p["gamma"]) for p in chunk.params.models]
    sizes = [top for top, _ in bands] + [top + target for top, target in bands]
    return [k if 0 < k < chunk.numel else None for k in sizes]


def _band_keep(chunk: Chunk, stats: Stats, i: int, d: torch.Tensor) -> torch.Tensor:
    """In the top n_top + target and not in the top n_top (equal |δ|: lower flat index ranks higher)."""
    p = chunk.params.models[i]
    n_top, target = _band(chunk.numel, p["density"], p["gamma"])
    s = importance.score(chunk, i, d)
    if n_top + target:
        keep = top_k_mask(s, len(chunk.models) + i, chunk, stats, "band")
    else:
        keep = torch.zeros_like(d, dtype=torch.bool)
    if n_top:
        keep &= ~top_k_mask(s, i, chunk, stats, "band")
    return keep


# --- DELLA (Deep et al., arXiv:2406.11617) --------------------------------------------------------

def _rank_norm(a: torch.Tensor, dim: int) -> torch.Tensor:
    """Ascending rank of |a| along ``dim`` scaled to [0, 1] (equal values: lower index first);
    a lone element gets 1/2."""
    m = a.shape[dim]
    if m < 2:
        return torch.full(a.shape, 0.5, dtype=torch.float64, device=a.device)
    return a.abs().argsort(dim=dim, stable=True).argsort(dim=dim).to(torch.float64) / (m - 1)


def _ranks_compiled(score: torch.Tensor) -> bool:
    """Whether ``compiled.della_keep`` ranks the rows of ``score`` (as ``_rank_norm`` does): a
    bfloat16 matrix, rows of two or more."""
    matrix = score.dim() == 2 and score.shape[1] >= 2
    return matrix and score.dtype == torch.bfloat16 and compiled.supports(score)


def _della_keep(chunk: Chunk, stats: Stats, i: int, d: torch.Tensor) -> torch.Tensor:
    """Keep with p = density − ε + 2ε·rank_norm, ranking |δ| (or the importance) along dim 1
    (mergekit's ``della_magprune``; a tensor below 2-D is one row, ranked whole by ``_della_finish``)."""
    p = chunk.params.models[i]
    low, eps = p["density"] - p["epsilon"], p["epsilon"]
    score = importance.score(chunk, i, d)
    if _ranks_compiled(score):
        runs = _stream(chunk, i).runs(chunk.element_start, d.numel())
        mask = compiled.della_keep(score, low, eps, runs)
        if mask is not None:
            return mask.reshape(d.shape)
    if d.dim() >= 2:
        rank = _rank_norm(score, 1)
    else:
        rank = stats["della_rank"][i][chunk.row_start : chunk.row_stop].reshape(d.shape)
    return _bernoulli(chunk, i, d, low + rank * 2 * eps)


def _della_fused(chunk: Chunk, stats: Stats, i: int) -> compiled.Keep:
    """DELLA's mask as the L1 pass packed it, else from ranking δ_i, formed here for it (and again in
    the kernel: a subtraction)."""
    mask = _packed_mask(chunk, stats, i)
    if mask is None:
        mask = _della_keep(chunk, stats, i, chunk.models[i] - chunk.base)
    return compiled.Keep(compiled.KEEP_MASKED, mask=mask)


def _della_collect(chunk: Chunk, stats: Stats) -> dict[str, torch.Tensor]:
    if len(chunk.shape) < 2:  # one engine row per element: gather |δ| to rank the whole tensor
        return {"magnitude": torch.stack([_row_sums(chunk, a) for a in _magnitudes(chunk)])}
    if not chunk.params.globals["rescale"]:
        return {}
    # the masks are kept for the merge: ranking a row costs more than the rest of the merge
    return _l1_rows(chunk, stats, _della_keep, _magnitudes(chunk), pack=True)


def _della_finish(totals: dict[str, torch.Tensor], chunk: Chunk, stats: Stats) -> Stats:
    """Ranks of a tensor below 2-D, and the L1 rescale: one pass, so rescaling reads the data once."""
    if "magnitude" not in totals:
        return _l1_finish_packed(totals, chunk, stats) if totals else stats
    stats = {**stats, "della_rank": [_rank_norm(a, 0) for a in totals["magnitude"]]}
    if not chunk.params.globals["rescale"]:
        return stats
    whole = replace(chunk, row_start=0, row_stop=chunk.total_rows)  # only its position is read; |δ| stands for δ
    return _l1_finish(_l1_rows(whole, stats, _della_keep, list(totals["magnitude"])), chunk, stats)


_DELLA = (StatPass(_della_collect, _della_finish, per_chunk=_PACKED),)


def _della_check(params: TensorParams) -> str | None:
    """DELLA's keep probabilities density ± ε must lie in (0, 1), as mergekit requires."""
    for p in params.models:
        d, e = p["density"], p["epsilon"]
        if not _whole(d) and not (0 < d - e and d + e < 1):
            return f"needs 0 < density - epsilon and density + epsilon < 1, got density {d}, epsilon {e}"
    return None


# --- the recipe ----------------------------------------------------------------------------------

def _weights(chunk: Chunk) -> list[float]:
    """mergekit multiplies by a weight tensor of the working dtype: each weight rounded to it."""
    return torch.tensor(chunk.params.per_model("weight"), dtype=chunk.base.dtype, device="cpu").tolist()


def _fused(chunk: Chunk, stats: Stats, keep: FusedKeep, consensus: bool) -> torch.Tensor | None:
    """The merge by ``compiled`` (the same bits in one pass), or None where it does not apply."""
    g = chunk.params.globals
    if (not chunk.models or not compiled.supports(chunk.base) or g.get("clamp_min") is not None
            or g.get("clamp_max") is not None):
        return None
    keeps, scales = [], []
    for i, p in enumerate(chunk.params.models):
        whole = _whole(p.get("density", 1.0))  # task_arithmetic has no density: it keeps all
        k = compiled.Keep() if whole else keep(chunk, stats, i)
        if k is None:
            return None
        keeps.append(k)
        scales.append(stats["l1_scale"][i] if not whole and "l1_scale" in stats else 1.0)
    weights = _weights(chunk)
    divide = 0.0
    if g["normalize"] and not consensus:
        total = torch.tensor(weights, dtype=chunk.base.dtype, device="cpu").sum().item()
        divide = total if abs(total) >= 1e-8 else 1.0
    return compiled.merge(chunk.base, chunk.models, keeps, scales, weights, consensus, g["normalize"],
                             divide, g["lambda"])


def _gta(sparsify: Sparsify | None, consensus: bool,
         fused_keep: FusedKeep | None) -> Callable[[Chunk, Stats], torch.Tensor]:
    def merge(chunk: Chunk, stats: Stats) -> torch.Tensor:
        # Plain task arithmetic too: its four torch ops took 0.36 ns an input element on a chunk
        # in cache, 1.5 out of it, against the kernel's 0.27 and 0.75.
        if fused_keep is not None:
            fused = _fused(chunk, stats, fused_keep, consensus)
            if fused is not None:
                return fused.reshape(chunk.base.shape)
        deltas = task_vectors(chunk, stats)
        if sparsify is not None:
            deltas = sparsify(chunk, stats, deltas)
        # Per-model products, not a stacked tensor times broadcast weights: same rounding, a fifth of the time.
        weights = _weights(chunk)
        weighted = [d.mul_(w) for d, w in zip(deltas, weights)]  # the deltas are this merge's own
        normalize = chunk.params.globals["normalize"]
        if consensus:
            agree = sign_agreement(weighted)
            mixed = sum_models([float_bits.select_(v, a) for v, a in zip(weighted, agree)])
            if normalize:
                divisor = sum_models([float_bits.constant_(w, a, mixed.dtype) for a, w in zip(agree, weights)])
                mixed /= float_bits.where_zero(divisor, 1)
        else:
            mixed = sum_models(weighted)
            if normalize:
                # rounded as mergekit's sum of its weight tensor
                total = torch.tensor(weights, dtype=mixed.dtype, device="cpu").sum().item()
                mixed /= total if abs(total) >= 1e-8 else 1
        if chunk.params.globals["lambda"] != 1:
            mixed *= chunk.params.globals["lambda"]
        low, high = chunk.params.globals.get("clamp_min"), chunk.params.globals.get("clamp_max")
        if low is not None or high is not None:
            mixed = mixed.clamp(low, high)
        return mixed.add_(chunk.base)  # = base + mixed: adding is commutative, and mixed is ours

    return merge


def _register(name: str, paper: str, doc: str, keep: Keep | None, consensus: bool,
              passes: tuple[StatPass, ...] | Passes, params: tuple[Param, ...],
              check: Callable[[TensorParams], str | None] | None = None, ranks: bool = False,
              fused_keep: FusedKeep | None = None) -> None:
    """``ranks``: the method keeps entries by a ranking ``importance`` may take from calibration statistics.
    ``fused_keep``: the keep mask for ``compiled`` (methods without one merge on the torch path)."""
    ranking = (importance.IMPORTANCE, importance.DAMP) if ranks else ()
    merge = _gta(None if keep is None else _sparsifier(keep), consensus, fused_keep)
    register(MergeMethod(name=name, merge=merge,
                         params=(_WEIGHT, *params, _LAMBDA, _INT8_MASK, *ranking),
                         base="required", precision="load", paper=paper, passes=passes, doc=doc, check=check,
                         min_models=0, statistics=importance.STATISTICS if ranks else None))


_TOPK = _with_rescale(_by_importance(top_k_passes(task_vectors, _keep_count, "topk", elementwise=True,
                                                  histograms=_delta_histograms),
                                     top_k_passes(_scores, _keep_count, "topk")), _top_k_keep)
_DARE = _with_rescale((), _dare_keep)
# one selection over the model list twice: entries [0, n) find the top n_top, [n, 2n) the top n_top + target
_BAND = _with_rescale(
    _by_importance(top_k_passes(lambda chunk, stats: task_vectors(chunk, stats) * 2, _band_counts, "band",
                                elementwise=True),
                   top_k_passes(lambda chunk, stats: _scores(chunk, stats) * 2, _band_counts, "band")),
    _band_keep)

def _clamp_check(params: TensorParams) -> str | None:
    low, high = params.globals["clamp_min"], params.globals["clamp_max"]
    if low is not None and high is not None and low > high:
        return f"needs clamp_min <= clamp_max, got clamp_min {low}, clamp_max {high}"
    return None


_register("task_arithmetic", "arXiv:2212.04089", "base + λ Σ w_i δ_i, optionally clamped elementwise (Ilharco et al., ICLR 2023)",
          # nothing is dropped: rescale is the identity
          None, False, (), (_normalize(False), _rescale(False), *_CLAMP), _clamp_check,
          fused_keep=lambda chunk, stats, i: compiled.Keep())
_register("ties", "arXiv:2306.01708", "top-k magnitude trim, sign election by mass, disjoint mean (Yadav et al., NeurIPS 2023)",
          _top_k_keep, True, _TOPK, (_DENSITY, _normalize(True), _rescale(False)), ranks=True,
          fused_keep=_top_k_fused)
_register("dare_ties", "arXiv:2311.03099", "random drop + L1 rescale, then TIES sign election (Yu et al., ICML 2024)",
          _dare_keep, True, _DARE, (_DENSITY, _normalize(False), _rescale(True)), fused_keep=_dare_fused)
_register("dare_linear", "arXiv:2311.03099", "random drop + L1 rescale, then a weighted sum (Yu et al., ICML 2024)",
          _dare_keep, False, _DARE, (_DENSITY, _normalize(False), _rescale(True)), fused_keep=_dare_fused)
_register("breadcrumbs", "arXiv:2312.06795", "drop the largest γ and the smallest |δ| so density stays, then a weighted sum (Davari & Belilovsky, 2023)",
          _band_keep, False, _BAND, (_DENSITY, _GAMMA, _normalize(False), _rescale(False)), ranks=True)
_register("breadcrumbs_ties", "arXiv:2312.06795", "breadcrumbs trim, then TIES sign election (Davari & Belilovsky, 2023)",
          _band_keep, True, _BAND, (_DENSITY, _GAMMA, _normalize(False), _rescale(False)), ranks=True)
_register("della", "arXiv:2406.11617", "random drop with keep probability rising with |δ| rank + L1 rescale, then TIES sign election (Deep et al., 2024)",
          _della_keep, True, _DELLA, (_DENSITY, _EPSILON, _normalize(True), _rescale(True)), _della_check,
          ranks=True, fused_keep=_della_fused)
_register("della_linear", "arXiv:2406.11617", "random drop with keep probability rising with |δ| rank + L1 rescale, then a weighted sum (Deep et al., 2024)",
          _della_keep, False, _DELLA, (_DENSITY, _EPSILON, _normalize(False), _rescale(True)), _della_check,
          ranks=True, fused_keep=_della_fused)
