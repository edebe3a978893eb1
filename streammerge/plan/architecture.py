"""Where a tensor sits in a decoder stack, from its name alone.

Layer tensors carry their layer number as the first purely numeric path component
(``model.layers.12.mlp.up_proj.weight`` in Llama, Mistral, Qwen2/3, Gemma and Phi-3;
``transformer.h.12.attn.c_attn.weight`` in GPT-2 and Falcon; ``gpt_neox.layers.12...`` in GPT-NeoX).
Other tensors are "pre" (embeddings, before the layers) or "post" (final norm, lm_head).
Mixture-of-experts checkpoints as published (Mixtral, Qwen3-MoE) hold one tensor per expert,
``model.layers.12.block_sparse_moe.experts.3.w1.weight``: the expert number comes after the layer
number, so the first numeric component is still the layer.
"""

from __future__ import annotations

import re

_LAYER = re.compile(r"(?:^|\.)(\d+)\.")
_PRE = ("embed", "wte", "wpe", "word_embeddings")


def layer_index(tensor: str) -> int | None:
    m = _LAYER.search(tensor)
    return int(m.group(1)) if m else None


def after_layer(tensor: str) -> str | None:
    """The part of a layer tensor's name after its layer number (``mlp.up_proj.weight``); None
    for a tensor outside the layers."""
    m = _LAYER.search(tensor)
    return tensor[m.end():] if m else None


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


# Module kinds, per architecture family (config.json `model_type`), as tensor-name fragments.
# `select.modules` takes these kind names as well as raw fragments.
_LLAMA_LIKE = {
    "attention": ("self_attn.",), "q": ("self_attn.q_proj",), "k": ("self_attn.k_proj",), "v": ("self_attn.v_proj",),
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
    "mlp": ("mlp.",), "norm": ("layernorm",),
}
MODULE_KINDS: dict[str, dict[str, tuple[str, ...]]] = {
    **{t: _LLAMA_LIKE for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")},
    "mixtral": {**_LLAMA_LIKE, "mlp": ("block_sparse_moe.",), "experts": ("block_sparse_moe.experts.",),
                "router": ("block_sparse_moe.gate.",)},
    "qwen3_moe": {**_LLAMA_LIKE, "experts": ("mlp.experts.",), "router": ("mlp.gate.",)},
    "phi3": {"attention": ("self_attn.",), "qkv": ("self_attn.qkv_proj",), "o": ("self_attn.o_proj",), "mlp": ("mlp.",),
             "norm": ("layernorm",)},
    "gpt2": {"attention": ("attn.",), "qkv": ("attn.c_attn",), "o": ("attn.c_proj",), "mlp": ("mlp.",), "norm": ("ln_",)},
    "gpt_neox": {"attention": ("attention.",), "qkv": ("attention.query_key_value",), "o": ("attention.dense",),
                 "mlp": ("mlp.",), "norm": ("layernorm",)},
    "falcon": {"attention": ("self_attention.",), "qkv": ("self_attention.query_key_value",), "o": ("self_attention.dense",),
               "mlp": ("mlp.",), "norm": ("ln_", "layernorm")},
}
KIND_NAMES = ("attention", "q", "k", "v", "qkv", "o", "mlp", "norm", "experts", "router")


def module_fragments(model_type: str | None, module: str) -> tuple[str, ...] | str:
    """The name fragments of ``module`` (a kind name or a raw fragment) in ``model_type``, or why
    the kind does not exist there."""
    if module not in KIND_NAMES:
        return (module,)
    kinds = MODULE_KINDS.get(model_type or "")
    if kinds is None:
        return f"module kinds are known for {', '.join(sorted(MODULE_KINDS))}, not {model_type!r}: name tensor-name fragments instead"
    if module in ("experts", "router") and module not in kinds:
        return f"{model_type} has no {module!r}: it is not a mixture-of-experts model (select 'mlp')"
    if module not in kinds:
        return f"{model_type} has no separate {module!r} projection (it fuses q, k and v: select 'qkv')"
    return kinds[module]


# mergekit 0.1.5 runs on transformers 5, which holds a layer's experts fused and converts the
# published per-expert tensors to that layout as it loads them; mergekit's parameter filters see the
# fused names. Per family: (pattern of a published name, what transformers 5 calls that tensor).
_EXPERT = r"\.experts\.\d+\."
_FUSED_NAMES: dict[str, tuple[tuple[re.Pattern, str], ...]] = {
    "mixtral": ((re.compile(rf"\.block_sparse_moe{_EXPERT}w[13]\.weight$"), ".mlp.experts.gate_up_proj"),
                (re.compile(rf"\.block_sparse_moe{_EXPERT}w2\.weight$"), ".mlp.experts.down_proj"),
                (re.compile(r"\.block_sparse_moe\."), ".mlp.")),
    "qwen3_moe": ((re.compile(rf"\.mlp{_EXPERT}(?:gate|up)_proj\.weight$"), ".mlp.experts.gate_up_proj"),
                  (re.compile(rf"\.mlp{_EXPERT}down_proj\.weight$"), ".mlp.experts.down_proj")),
}


def filter_name(model_type: str | None, tensor: str) -> str:
    """The name a parameter's ``filter`` is matched against: ``tensor`` as mergekit 0.1.5 names it
    (``model.layers.0.block_sparse_moe.experts.3.w2.weight`` -> ``model.layers.0.mlp.experts.down_proj``)."""
    for pattern, fused in _FUSED_NAMES.get(model_type or "", ()):
        tensor = pattern.sub(fused, tensor)
    return tensor


# Multi-module architectures (mergekit's "modular" definitions, by config.json model_type): each
# module's tensor-name prefix and the config.json key of its layer count (None: it has no layers).
# Every other architecture is one module, "default", over all tensors.
_VISION_LANGUAGE = {"text_decoder": ("language_model.", "text_config.num_hidden_layers"),
                    "multi_modal_projector": ("multi_modal_projector.", None)}
MODULES: dict[str, dict[str, tuple[str, str | None]]] = {
    "mistral3": {**_VISION_LANGUAGE, "vision_tower": ("vision_tower.", "vision_config.num_hidden_layers")},
    "gemma3": {**_VISION_LANGUAGE, "vision_tower": ("vision_tower.vision_model.", "vision_config.num_hidden_layers")},
}


def architecture_modules(model_type: str | None) -> dict[str, tuple[str, str | None]]:
    return MODULES.get(model_type or "", {"default": ("", "num_hidden_layers")})
