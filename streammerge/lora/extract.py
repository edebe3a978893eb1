"""Extracting a LoRA adapter from a fine-tune: which modules become what, and the factorisation.

For a 2-D module, the update ΔW = W_ft − W_base is factored by its truncated singular value
decomposition (Eckart–Young: the best rank-r approximation in the Frobenius norm),

    ΔW ≈ U_r diag(σ_1..σ_r) V_rᵀ,   r = min(max_rank, rank(ΔW), #{σ_i > ε} when ε > 0),

with error ‖ΔW − B·A‖_F = √(Σ_{i>r} σ_i²). With ``distribute_scale`` (the default) the singular
values are split evenly, A = diag(√σ) V_rᵀ and B = U_r diag(√σ), so both factors have the same
scale; without it A = diag(σ) V_rᵀ and B = U_r. PEFT computes B·A·(lora_alpha / r), so the
adapter is written with lora_alpha = r. An embedding ([vocab, dim]) is factored transposed, as
PEFT stores ``lora_embedding_A`` [r, vocab] and ``lora_embedding_B`` [dim, r].

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
from typing import Literal

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


# Above this many bytes of float32 difference, the SVD goes through a QR factorisation first.
LEAN_BYTES = 64 << 20


def _top_singular(delta: torch.Tensor, lean: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, σ, Vᵀ) of ``delta`` [rows, cols], thin.

    Direct, this is LAPACK's gesdd, as mergekit calls it; it holds a copy of ``delta``, U, Vᵀ and
    a workspace of ~5·k² floats (k = min(rows, cols)): 1.1 GiB at 11008 × 4096. ``lean`` takes the
    route gesdd itself takes for a tall matrix T (``delta`` or its transpose), QR first, without
    forming Q: T = Q·R, R = U_R·diag(σ)·W_Rᵀ, so T's right singular vectors are W_R and its left
    ones T·W_R·diag(1/σ) — the same factors up to the sign of each singular pair, in ~0.6 of the
    memory. The left vectors are formed for all k pairs and cut by the caller."""
    if not lean:
        return torch.linalg.svd(delta, full_matrices=False)
    tall = delta.shape[0] >= delta.shape[1]
    t = delta if tall else delta.T
    r = torch.linalg.qr(t, mode="r").R
    _, s, wh = torch.linalg.svd(r, full_matrices=False)
    del r
    w = wh.T
    p = (t @ w).div_(torch.where(s > 0, s, torch.ones_like(s)))  # columns of σ = 0 carry no weight
    return (p, s, w.T) if tall else (w, s, p.T)


def factor(delta: torch.Tensor, max_rank: int, sv_epsilon: float = 0.0,
           distribute_scale: bool = True, lean: bool | None = None) -> Factors:
    """The truncated SVD of ``delta`` (float32, [rows, cols]) as B [rows, r] and A [r, cols] with
    B·A ≈ delta. Singular values ≤ ``sv_epsilon`` are dropped when it is positive. ``lean``
    (default: for differences over ``LEAN_BYTES``) bounds the memory; see ``_top_singular``."""
    if lean is None:
        lean = delta.numel() * delta.element_size() > LEAN_BYTES
    u, s, vh = _top_singular(delta, lean)
    rank = min(max_rank, s.shape[0])
    if sv_epsilon > 0:
        rank = min(rank, int((s > sv_epsilon).sum()))
    top = s[:rank]
    left, right = (top.sqrt(), top.sqrt()) if distribute_scale else (torch.ones_like(top), top)
    b = u[:, :rank] * left  # U diag(left): columns scaled, as the SVD's pairs are columns of U
    a = right[:, None] * vh[:rank]
    return Factors(a.contiguous(), b.contiguous(), s)
