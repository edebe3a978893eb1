"""The MoE architectures mergekit-moe 0.1.5 writes (``mergekit/moe/{mixtral,qwen,qwen3,deepseek}.py``):
which inputs each takes, its config.json, and the names of its experts and routers.

The tensors are written in the layout the architectures' published checkpoints use, one tensor
per expert and projection (Mixtral-8x7B's ``block_sparse_moe.experts.{e}.w1``, Qwen1.5-MoE's and
Qwen3-30B-A3B's ``mlp.experts.{e}.gate_proj``, deepseek-moe-16b's), which transformers 4 and 5,
vLLM and llama.cpp's converter all read, and which streams one expert at a time. (mergekit 0.1.5
writes Mixtral and Qwen3-MoE in transformers 5's in-memory layout instead, every expert of a layer
fused in one ``mlp.experts.gate_up_proj``; transformers 5 converts the published layout to it on
loading, so the models load the same.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from streammerge.errors import PlanError
from streammerge.forward.skeleton import import_transformers
from streammerge.moe.config import MoEConfig

PROJECTIONS = (
    "gate_proj",
    "up_proj",
    "down_proj",
)  # a dense model's MLP, ``model.layers.{i}.mlp.*``
_MIXTRAL_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
_LLAMA_LIKE = ("llama", "mistral")


@dataclass(frozen=True)
class OutputArchitecture:
    """One of mergekit-moe's output architectures.

    ``refusal(config, model_types)``: why it cannot build ``config`` from models of these
    ``model_type``s (base, experts, shared experts), or None. ``expert(i, e, proj)`` names expert
    ``e``'s projection ``proj`` in layer ``i``; ``shared(i, proj)`` the shared expert's, if any;
    ``router(i)`` the router [experts, hidden]; ``shared_router(i)`` the shared expert's gate
    [1, hidden], if it has one."""

    name: str  # as mergekit names it; `architecture:` selects by its prefix, case-insensitively
    refusal: Callable[[MoEConfig, list[str]], str | None]
    expert: Callable[[int, int, str], str]
    router: Callable[[int], str]
    shared: Callable[[int, str], str] | None = None
    shared_router: Callable[[int], str] | None = None
    needs_attention_bias: bool = (
        False  # Qwen2-MoE's attention has q/k/v biases: zeros when the base has none
    )


def _same_type(model_types: list[str], allowed: tuple[str, ...], name: str) -> str | None:
    if len(set(model_types)) != 1:
        return (
            f"{name} needs every input of one model_type, got {', '.join(sorted(set(model_types)))}"
        )
    if model_types[0] not in allowed:
        return f"{name} builds from {' or '.join(allowed)} models, not {model_types[0]}"
    return None


def _mixtral_refusal(config: MoEConfig, types: list[str]) -> str | None:
    if config.shared_experts:
        return "Mixtral has no shared experts"
    return _same_type(types, _LLAMA_LIKE, "Mixtral")


def _deepseek_refusal(config: MoEConfig, types: list[str]) -> str | None:
    shared = config.shared_experts or []
    if len(shared) > 1:
        return "DeepSeek MoE takes at most one shared expert"
    if shared and (shared[0].positive_prompts or shared[0].negative_prompts):
        return "DeepSeek MoE's shared expert has no gate (give it no prompts)"
    return _same_type(types, _LLAMA_LIKE, "DeepSeek MoE")


def _qwen_refusal(config: MoEConfig, types: list[str]) -> str | None:
    shared = config.shared_experts or []
    if len(shared) != 1:
        return "Qwen MoE (Qwen2-MoE) needs exactly one shared expert"
    if config.gate_mode != "random" and not shared[0].positive_prompts:
        return "Qwen MoE's shared expert needs positive_prompts for its gate"
    return _same_type(types, (*_LLAMA_LIKE, "qwen2"), "Qwen MoE")


def _qwen3_refusal(config: MoEConfig, types: list[str]) -> str | None:
    if config.shared_experts:
        return "Qwen3 MoE has no shared experts"
    return None if set(types) == {"qwen3"} else "Qwen3 MoE builds from qwen3 models only"


def _mlp(i: int) -> str:
    return f"model.layers.{i}.mlp"


def _expert(i: int, e: int, proj: str) -> str:
    """Qwen's and DeepSeek's expert names: the dense MLP's, under ``experts.{e}``."""
    return f"{_mlp(i)}.experts.{e}.{proj}.weight"


def _router(i: int) -> str:
    return f"{_mlp(i)}.gate.weight"


MIXTRAL = OutputArchitecture(
    "Mixtral",
    _mixtral_refusal,
    expert=lambda i, e, p: (
        f"model.layers.{i}.block_sparse_moe.experts.{e}.{_MIXTRAL_NAMES[p]}.weight"
    ),
    router=lambda i: f"model.layers.{i}.block_sparse_moe.gate.weight",
)
DEEPSEEK = OutputArchitecture(
    "DeepSeek MoE",
    _deepseek_refusal,
    expert=_expert,
    router=_router,
    shared=lambda i, p: f"{_mlp(i)}.shared_experts.{p}.weight",
)
QWEN = OutputArchitecture(
    "Qwen MoE",
    _qwen_refusal,
    expert=_expert,
    router=_router,
    shared=lambda i, p: f"{_mlp(i)}.shared_expert.{p}.weight",
    shared_router=lambda i: f"{_mlp(i)}.shared_expert_gate.weight",
    needs_attention_bias=True,
)
QWEN3 = OutputArchitecture(
    "Qwen3 MoE",
    _qwen3_refusal,
    expert=_expert,
    router=_router,
)
# mergekit's order: the first that fits is taken when the config names none (Mixtral preferred).
ARCHITECTURES = (MIXTRAL, DEEPSEEK, QWEN, QWEN3)


def select_architecture(
    config: MoEConfig, model_types: list[str], where: str
) -> OutputArchitecture:
    """The output architecture, as mergekit-moe's ``select_output_arch`` picks it: those whose name
    starts with ``architecture:`` (all when it is not given) that can build the config, Mixtral if
    it is among them, else the first."""
    names = ", ".join(a.name.split()[0].lower() for a in ARCHITECTURES)
    candidates = [
        a
        for a in ARCHITECTURES
        if config.architecture is None or a.name.lower().startswith(config.architecture.lower())
    ]
    if not candidates:
        raise PlanError(
            f"{where}: architecture: unknown output architecture {config.architecture!r}; "
            f"expected one of {names}"
        )
    refusals = {a.name: a.refusal(config, model_types) for a in candidates}
    fitting = [a for a in candidates if refusals[a.name] is None]
    if not fitting:
        why = "; ".join(f"{name}: {reason}" for name, reason in refusals.items())
        raise PlanError(f"{where}: no output architecture can be built from these models ({why})")
    return next((a for a in fitting if a is MIXTRAL), fitting[0])


def output_config(
    arch: OutputArchitecture,
    base_dir: str | Path,
    config: MoEConfig,
    out_dtype: torch.dtype,
    num_shared: int,
) -> dict[str, Any]:
    """config.json of the MoE, as mergekit-moe writes it: the base's config converted to the
    architecture's config class, with the expert counts (transformers' own classes fill in the
    rest, and only what differs from their defaults is written, as ``save_pretrained`` does)."""
    transformers = import_transformers()
    base = transformers.AutoConfig.from_pretrained(base_dir)
    experts, top_k = len(config.experts), config.experts_per_token
    if arch is DEEPSEEK:  # no config class in transformers: mergekit writes the dict itself
        out = base.to_dict()
        out.pop(
            "_name_or_path", None
        )  # mergekit keeps the base's local path; it means nothing elsewhere
        out.update(
            architectures=["DeepseekForCausalLM"],
            model_type="deepseek",
            n_routed_experts=experts,
            n_shared_experts=num_shared or None,
            num_experts_per_tok=top_k or (1 if num_shared else 2),
            first_k_dense_replace=0,
            moe_layer_freq=1,
            scoring_func="softmax",
            norm_topk_prob=True,
            moe_intermediate_size=out["intermediate_size"],
            auto_map={
                k: f"deepseek-ai/deepseek-moe-16b-base--{v}"
                for k, v in (
                    ("AutoConfig", "configuration_deepseek.DeepseekConfig"),
                    ("AutoModel", "modeling_deepseek.DeepseekModel"),
                    ("AutoModelForCausalLM", "modeling_deepseek.DeepseekForCausalLM"),
                )
            },
        )
        out["torch_dtype"] = str(out_dtype).removeprefix("torch.")
        return out
    if arch is MIXTRAL:
        if not isinstance(base, transformers.MistralConfig):
            positions = base.max_position_embeddings
            base = transformers.MistralConfig(**base.to_dict())
            base.sliding_window, base.max_position_embeddings = None, positions
        cfg = transformers.MixtralConfig(**base.to_dict())
        cfg.architectures, cfg.num_local_experts = ["MixtralForCausalLM"], experts
        cfg.num_experts_per_tok, cfg.sliding_window = top_k or 2, None
    else:
        cls = transformers.Qwen2MoeConfig if arch is QWEN else transformers.Qwen3MoeConfig
        cfg = cls(**base.to_dict())
        cfg.architectures = ["Qwen2MoeForCausalLM" if arch is QWEN else "Qwen3MoeForCausalLM"]
        cfg.num_experts, cfg.num_experts_per_tok = experts, top_k or 2
        cfg.decoder_sparse_step, cfg.norm_topk_prob = 1, True
        cfg.moe_intermediate_size = cfg.intermediate_size
        if arch is QWEN:
            cfg.sliding_window, cfg.use_sliding_window = None, False
            cfg.shared_expert_intermediate_size = cfg.intermediate_size
            if getattr(cfg, "layer_types", None):
                # mergekit leaves a sliding base's "sliding_attention" layers, which without a window
                # fail in transformers 5: with the window off, every layer attends fully
                cfg.layer_types = ["full_attention"] * len(cfg.layer_types)
    cfg.dtype = out_dtype  # transformers 5's name for torch_dtype
    return cfg.to_diff_dict()
