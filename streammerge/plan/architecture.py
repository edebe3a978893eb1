"""Where a tensor sits in a decoder stack, from its name alone.

Layer tensors carry their layer number as the first purely numeric path component
(``model.layers.12.mlp.up_proj.weight`` in Llama, Mistral, Qwen2/3, Gemma and Phi-3;
``transformer.h.12.attn.c_attn.weight`` in GPT-2 and Falcon; ``gpt_neox.layers.12...`` in GPT-NeoX).
Other tensors are "pre" (embeddings, before the layers) or "post" (final norm, lm_head).
"""

from __future__ import annotations

import re

_LAYER = re.compile(r"(?:^|\.)(\d+)\.")
_PRE = ("embed", "wte", "wpe", "word_embeddings")


def layer_index(tensor: str) -> int | None:
    m = _LAYER.search(tensor)
    return int(m.group(1)) if m else None


def with_layer(tensor: str, layer: int) -> str:
    """``tensor`` with its layer number replaced by ``layer``."""
    m = _LAYER.search(tensor)
    assert m is not None, tensor
    return tensor[: m.start(1)] + str(layer) + tensor[m.end(1) :]


def is_pre_layer(tensor: str) -> bool:
    return layer_index(tensor) is None and any(p in tensor for p in _PRE)


# Output heads that a tied checkpoint omits, and the embeddings they are tied to.
TIED_HEADS = {
    "lm_head.weight": ("model.embed_tokens.weight", "transformer.wte.weight"),
    "embed_out.weight": ("gpt_neox.embed_in.weight",),
}
_VOCAB = ("embed_tokens", "wte.", "word_embeddings", "embed_in", "lm_head", "embed_out")


def is_vocab_tensor(tensor: str) -> bool:
    """Embedding or output-head matrices, whose rows are the vocabulary."""
    return layer_index(tensor) is None and any(v in tensor for v in _VOCAB)


def tied_partner(tensor: str, available: dict) -> str | None:
    """The embedding a missing tied head stands for in a checkpoint with ``available`` tensors."""
    return next((p for p in TIED_HEADS.get(tensor, ()) if p in available), None)
