"""The extract-lora golden cases, shared by scripts/make_extract_lora_goldens.py and
tests/test_extract_lora.py: tiny Llama, Mistral and Qwen2 stand-ins (float32, two layers, in
their Hugging Face layout, from family_builder; ``-tied``: with tied embeddings, no lm_head
tensor) and mergekit-extract-lora's options for each.

A fine-tune's update is a rank-3 part plus small full-rank noise, so a rank-4 extraction keeps
most of it and truncation still drops something in every module.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from checkpoint_builder import random_tensors
from family_builder import family_seed, layout, write_standin

LAYERS = 2
# case -> (family, mergekit-extract-lora options)
CASES: dict[str, tuple[str, list[str]]] = {
    "llama_default": ("llama", ["--max-rank", "4"]),
    "mistral_embed_no_distribute": ("mistral", ["--max-rank", "4", "--embed-lora", "--no-distribute-scale"]),
    # with --save-module, mergekit 0.1.5 fails on anything it adds to modules_to_save (a tuple it
    # appends to): embeddings and norms must be factored or skipped
    "qwen2_epsilon_filters": ("qwen2", ["--max-rank", "8", "--sv-epsilon", "0.004", "-e", r"layers\.1\.mlp",
                                        "--save-module", "o_proj", "--skip-undecomposable", "--embed-lora"]),
    # mergekit reads a tied model's head as its embedding and writes it too
    "qwen2_tied": ("qwen2-tied", ["--max-rank", "4"]),
    "llama_tied_embed_lora": ("llama-tied", ["--max-rank", "4", "--embed-lora"]),
}


def fine_tuned(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in base.items():
        if w.dim() == 2:
            rows, cols = w.shape
            low = torch.randn(rows, 3, generator=g, dtype=torch.float64) @ torch.randn(3, cols, generator=g,
                                                                                      dtype=torch.float64)
            out[name] = w + 0.01 * low + 0.001 * torch.randn(w.shape, generator=g, dtype=torch.float64)
        else:
            out[name] = w + 0.01 * torch.randn(w.shape, generator=g, dtype=torch.float64)
    return out


def build(root: Path, stand_in: str, dtype: torch.dtype = torch.float32) -> tuple[Path, Path]:
    """``root/base`` and ``root/ft`` of one family (``family`` or ``family-tied``); returns (base, ft)."""
    family, _, variant = stand_in.partition("-")
    shapes, config = layout(family, LAYERS)
    if variant == "tied":
        shapes.pop("lm_head.weight")
        config["tie_word_embeddings"] = True
    base = random_tensors(shapes, family_seed(family))
    ft = fine_tuned(base, family_seed(family) + 7)
    return (write_standin(root / "base", family, base, config, dtype),
            write_standin(root / "ft", family, ft, config, dtype))


def fingerprint(model: Path) -> str:
    """The sha256 of a stand-in's weights file: whether the builders still make the golden's inputs."""
    return hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest()
