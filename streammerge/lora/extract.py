"""Extracting a LoRA adapter from a fine-tune: which modules become what, and the factorisation.

For a 2-D module, the update ΔW = W_ft − W_base is factored by its truncated singular value
decomposition (Eckart–Young: the best rank-r approximation in the Frobenius norm),

    ΔW ≈ U_r diag(σ_1..σ_r) V_rᵀ,   r = min(max_rank, rank(ΔW), #{σ_i > ε} when ε > 0),

with error ‖ΔW − B·A‖_F = √(Σ_{i>r} σ_i²). With ``distribute_scale`` (the default) the singular
values are split evenly, A = diag(√σ) V_rᵀ and B = U_r diag(√σ), so both factors have the same
scale; without it A = diag(σ) V_rᵀ and B = U_r. PEFT computes B·A·(lora_alpha / r), so the
adapter is written with lora_alpha = r. An embedding ([vocab, dim]) is factored transposed, as
PEFT stores ``lora_embedding_A`` [r, vocab] and ``lora_embedding_B`` [dim, r]. Small differences
are decomposed whole by LAPACK's gesdd, as mergekit does; large ones a block of rows at a time
(``factor_rows``: tall-skinny QR, then the SVD of R; Demmel et al., "Communication-optimal
parallel and sequential QR and LU factorizations", 2012), within the memory of one k × k SVD.

Which module gets what follows mergekit-extract-lora 0.1.5 (``mergekit/scripts/extract_lora.py``):
embeddings and the output head are saved whole in ``modules_to_save`` unless ``embed_lora``; a
module named (in full, or by its last name component) by ``save_modules`` is saved whole; of the
rest, those ``include`` / ``exclude`` regexes keep are factored when they are matrices, and
saved whole (their last name component joining ``modules_to_save``) or, with
``skip_undecomposable``, left out when they are not (norms). A module's bias goes with its weight:
whole when the weight is saved whole, as the difference ``lora_B.bias`` when it is factored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from streammerge.io.reader import TensorInfo
from streammerge.plan.architecture import is_pre_layer, is_vocab_tensor, layer_index


@dataclass(frozen=True)
class ExtractOptions:
    """mergekit-extract-lora's options, with its defaults."""

    max_rank: int = 128
    distribute_scale: bool = True
    embed_lora: bool = False
    save_modules: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()  # regexes searched in module names
    include: tuple[str, ...] = ()
    sv_epsilon: float = 0.0
    skip_undecomposable: bool = False
    compute_dtype: Literal["auto", "float32"] = "auto"  # ΔW in the inputs' dtype (mergekit), or exact


Kind = Literal["lora", "embedding", "save"]


@dataclass(frozen=True)
class ModuleTask:
    """One module of the fine-tune and what the adapter holds for it."""

    module: str  # e.g. model.layers.0.self_attn.q_proj
    kind: Kind  # factored (lora / embedding: transposed), or saved whole
    weight: str  # tensor names in the fine-tune
    bias: str | None

    @property
    def tensors(self) -> tuple[str, ...]:
        return (self.weight,) if self.bias is None else (self.weight, self.bias)


@dataclass(frozen=True)
class Extraction:
    tasks: list[ModuleTask]
    modules_to_save: list[str]  # as adapter_config.json lists them (mostly last name components)
    skipped: list[str]  # undecomposable modules left out (--skip-undecomposable)
    ignored: list[str]  # tensors that are no module's weight or bias


def _order(name: str) -> tuple[int, int]:
    """Embeddings first, then the layers in order, then the final norm and last the output head:
    the order of a model's modules, which fixes the order of ``modules_to_save``."""
    layer = layer_index(name)
    if layer is not None:
        return (1, layer)
    return (0, 0) if is_pre_layer(name) else (2, int(is_vocab_tensor(name)))


def plan_extraction(tensors: dict[str, TensorInfo], options: ExtractOptions,
                    embed_lora: bool) -> Extraction:
    """What the adapter holds for each module of a fine-tune with ``tensors``. ``embed_lora`` is
    the option as it applies (off when the vocabularies differ)."""
    modules: dict[str, dict[str, str]] = {}
    ignored = []
    for name in sorted(tensors, key=_order):  # a stable sort: the checkpoint's order within a group
        module, _, leaf = name.rpartition(".")
        if leaf in ("weight", "bias") and module:
            modules.setdefault(module, {})[leaf] = name
        else:
            ignored.append(name)
    to_save = list(options.save_modules)
    tasks, skipped = [], []

    def extracted(module: str) -> bool:
        if options.include and not any(re.search(r, module) for r in options.include):
            return False
        return not any(re.search(r, module) for r in options.exclude)

    for module, names in modules.items():
        weight, bias = names.get("weight"), names.get("bias")
        if weight is None:
            ignored.append(bias)  # a bias without a weight belongs to no module PEFT knows
            continue
        key = module.rpartition(".")[2]
        matrix = len(tensors[weight].shape) == 2
        embedding = matrix and is_pre_layer(weight)  # nn.Embedding: tokens, or positions (GPT-2's wpe)
        vocab = embedding or (matrix and is_vocab_tensor(weight))  # or the output head
        if vocab and not embed_lora and not any(re.search(r, module) for r in options.exclude):
            if key not in to_save:
                to_save.append(key)
        if module in to_save or key in to_save:
            tasks.append(ModuleTask(module, "save", weight, bias))
        elif not extracted(module):
            continue
        elif matrix:
            tasks.append(ModuleTask(module, "embedding" if embedding else "lora", weight, bias))
        elif options.skip_undecomposable:
            skipped.append(module)
        else:
            if key not in to_save:
                to_save.append(key)
            tasks.append(ModuleTask(module, "save", weight, bias))
    return Extraction(tasks, to_save, skipped, ignored)


@dataclass(frozen=True)
class Factors:
    a: torch.Tensor  # [r, cols]
    b: torch.Tensor  # [rows, r]
    singular_values: torch.Tensor  # all of them, descending

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def truncation_error(self) -> float:
        """‖ΔW − B·A‖_F, as the dropped singular values predict it."""
        return float(self.singular_values[self.rank:].double().square().sum().sqrt())


# Above this many bytes of float32 difference, a module is factored from blocks of rows of it.
LEAN_BYTES = 64 << 20
LEAN_BLOCK_BYTES = 64 << 20  # float32 bytes of one block

RowReader = Callable[[int, int], torch.Tensor]  # rows [start, stop) of ΔW as stored, in float32


def _truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int,
              distribute_scale: bool) -> Factors:
    """B = U_r·diag(left), A = diag(right)·V_rᵀ with left·right = σ (√σ each, or 1 and σ)."""
    top = s[:rank]
    left, right = (top.sqrt(), top.sqrt()) if distribute_scale else (torch.ones_like(top), top)
    b = u[:, :rank] * left  # columns scaled: the SVD's pairs are columns of U
    a = right[:, None] * vh[:rank]
    return Factors(a.contiguous(), b.contiguous(), s)


def _rank(s: torch.Tensor, max_rank: int, sv_epsilon: float) -> int:
    """mergekit's rank: at most ``max_rank``, and only σ > ε when ε > 0."""
    rank = min(max_rank, s.shape[0])
    return min(rank, int((s > sv_epsilon).sum())) if sv_epsilon > 0 else rank


def factor(delta: torch.Tensor, max_rank: int, sv_epsilon: float = 0.0,
           distribute_scale: bool = True) -> Factors:
    """The truncated SVD of ``delta`` (float32, [rows, cols]) as B [rows, r] and A [r, cols] with
    B·A ≈ delta, by LAPACK's gesdd as mergekit computes it. Singular values ≤ ``sv_epsilon`` are
    dropped when it is positive."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return _truncate(u, s, vh, _rank(s, max_rank, sv_epsilon), distribute_scale)


def _stacked_r(r: torch.Tensor | None, block: torch.Tensor) -> torch.Tensor:
    """The R of [R_so_far; block]: a tall-skinny QR a block at a time (RᵀR stays TᵀT)."""
    return torch.linalg.qr(block if r is None else torch.cat([r, block]), mode="r").R


def _lean_svd(read: RowReader, shape: tuple[int, int], keep: Callable[[torch.Tensor], int],
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_k, σ, V_kᵀ) of ΔW [rows, cols], k = ``keep(σ)``, without ΔW's copies and gesdd's large
    workspace. For the tall one T of ΔW and ΔWᵀ: T = Q·R with R from a QR over blocks of T's rows
    (Q never formed), R = U_R·diag(σ)·W_Rᵀ, so T's right singular vectors are W_R and its left
    ones T·W_R·diag(1/σ), the product taken over blocks of ΔW's rows read again. When T = ΔW
    (rows ≥ cols) ΔW is only ever read a block at a time; otherwise it is held for the QR over its
    column blocks and dropped before R's SVD. Peak: the k × k SVD of R plus one block."""
    rows, cols = shape
    step = max(1, LEAN_BLOCK_BYTES // (4 * cols))
    blocks = [(start, min(start + step, rows)) for start in range(0, rows, step)]
    r = None
    if rows >= cols:
        for start, stop in blocks:
            r = _stacked_r(r, read(start, stop).to(device))
    else:
        whole = read(0, rows).to(device)
        width = max(1, LEAN_BLOCK_BYTES // (4 * rows))
        for start in range(0, cols, width):
            r = _stacked_r(r, whole[:, start:start + width].T)
        del whole
    assert r is not None
    _, s, wh = torch.linalg.svd(r, full_matrices=False)
    del r
    k = keep(s)
    w = wh[:k].T  # T's right singular vectors
    safe = torch.where(s[:k] > 0, s[:k], torch.ones_like(s[:k]))  # a pair of σ = 0 carries no weight
    if rows >= cols:  # U_k = ΔW·W / σ, a block of rows at a time
        u = torch.empty(rows, k, device=device)
        for start, stop in blocks:
            u[start:stop] = read(start, stop).to(device) @ w
        return u.div_(safe), s, w.T
    vh = torch.zeros(k, cols, device=device)  # V_kᵀ = diag(1/σ)·Wᵀ·ΔW, summed over blocks of rows
    for start, stop in blocks:
        vh += w[start:stop].T @ read(start, stop).to(device)
    return w, s, vh.div_(safe[:, None])


def factor_rows(read: RowReader, shape: tuple[int, int], max_rank: int, sv_epsilon: float = 0.0,
                distribute_scale: bool = True, transpose: bool = False, lean: bool | None = None,
                device: torch.device = torch.device("cpu")) -> Factors:
    """``factor`` of ΔW (or of ΔWᵀ with ``transpose``: an embedding), ΔW [rows, cols] read by
    ``read`` in blocks of rows. Up to ``LEAN_BYTES`` (or with ``lean`` False) ΔW is read whole and
    factored as mergekit factors it; above, by ``_lean_svd`` in bounded memory: the same factors
    up to the sign of each singular pair and rounding."""
    if lean is None:
        lean = shape[0] * shape[1] * 4 > LEAN_BYTES
    if not lean:
        delta = read(0, shape[0]).to(device)
        return factor(delta.T if transpose else delta, max_rank, sv_epsilon, distribute_scale)
    u, s, vh = _lean_svd(read, shape, lambda s: _rank(s, max_rank, sv_epsilon), device)
    if transpose:  # ΔWᵀ = V·diag(σ)·Uᵀ
        u, vh = vh.T, u.T
    return _truncate(u, s, vh, vh.shape[0], distribute_scale)
