"""Tiny Mixtral and Qwen3-MoE checkpoints in the layout published on the Hugging Face Hub.

One tensor per expert and projection, under the names the Hub checkpoints use
(``mistralai/Mixtral-8x7B-v0.1``, ``Qwen/Qwen3-30B-A3B``), with the config.json keys they ship.
Recent transformers hold the experts fused in memory (``mlp.experts.gate_up_proj``) and convert
this layout while loading; ``fused_state_dict`` is that conversion, written out independently so a
test can load a reference state dict into a model built from its config.
The tensors, fine-tunes and files come from ``checkpoint_builder``; only the layout is new here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

_MIXTRAL_EXPERT = {"gate": "w1", "up": "w3", "down": "w2"}
_QWEN3_EXPERT = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


@dataclass(frozen=True)
class MoEArch:
    """The shape ratios of the family at tiny size: Qwen3-MoE's attention is wider than its hidden
    size (heads x head_dim = 2 x hidden), as in Qwen3-30B-A3B."""

    family: str  # config.json model_type: "mixtral" or "qwen3_moe"
    hidden: int = 32
    expert_intermediate: int = 24
    layers: int = 3
    vocab: int = 96
    heads: int = 4
    kv_heads: int = 2
    experts: int = 4
    top_k: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads if self.family == "mixtral" else 2 * self.hidden // self.heads

    @property
    def mlp(self) -> str:
        """The module that holds the router and the experts."""
        return "block_sparse_moe" if self.family == "mixtral" else "mlp"

    @property
    def projections(self) -> dict[str, str]:
        """Each expert's gate, up and down projection, by its name in the checkpoint."""
        return _MIXTRAL_EXPERT if self.family == "mixtral" else _QWEN3_EXPERT

    def expert(self, layer: int, expert: int, role: str) -> str:
        return f"model.layers.{layer}.{self.mlp}.experts.{expert}.{self.projections[role]}.weight"

    def shapes(self) -> dict[str, tuple[int, ...]]:
        h, i, d = self.hidden, self.expert_intermediate, self.head_dim
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h)}
        for n in range(self.layers):
            p = f"model.layers.{n}."
            a = p + "self_attn."
            out |= {a + "q_proj.weight": (self.heads * d, h), a + "k_proj.weight": (self.kv_heads * d, h),
                    a + "v_proj.weight": (self.kv_heads * d, h), a + "o_proj.weight": (h, self.heads * d)}
            if self.family == "qwen3_moe":
                out |= {a + "q_norm.weight": (d,), a + "k_norm.weight": (d,)}
            out[p + f"{self.mlp}.gate.weight"] = (self.experts, h)
            for e in range(self.experts):
                out |= {self.expert(n, e, "gate"): (i, h), self.expert(n, e, "up"): (i, h),
                        self.expert(n, e, "down"): (h, i)}
            out |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
        return out | {"model.norm.weight": (h,), "lm_head.weight": (self.vocab, h)}

    def config(self, dtype: torch.dtype) -> dict:
        common = {"hidden_size": self.hidden, "num_hidden_layers": self.layers,
                  "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
                  "vocab_size": self.vocab, "max_position_embeddings": 64, "hidden_act": "silu",
                  "num_experts_per_tok": self.top_k, "tie_word_embeddings": False,
                  "torch_dtype": str(dtype).removeprefix("torch."), "bos_token_id": 1, "eos_token_id": 2,
                  "attention_dropout": 0.0, "initializer_range": 0.02, "output_router_logits": False,
                  "use_cache": True, "sliding_window": None}
        if self.family == "mixtral":
            return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", **common,
                    "intermediate_size": self.expert_intermediate, "num_local_experts": self.experts,
                    "rms_norm_eps": 1e-5, "rope_theta": 1e6, "router_aux_loss_coef": 0.02}
        return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", **common,
                "head_dim": self.head_dim, "intermediate_size": 3 * self.expert_intermediate,
                "moe_intermediate_size": self.expert_intermediate, "num_experts": self.experts,
                "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
                "attention_bias": False, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "rope_scaling": None,
                "router_aux_loss_coef": 0.001, "use_sliding_window": False, "max_window_layers": self.layers}


def arch_of(checkpoint: Path) -> MoEArch:
    """The ``MoEArch`` a checkpoint written from one was made with, from its config.json."""
    c = json.loads((checkpoint / "config.json").read_text())
    mixtral = c["model_type"] == "mixtral"
    return MoEArch(c["model_type"], hidden=c["hidden_size"], layers=c["num_hidden_layers"],
                   vocab=c["vocab_size"], heads=c["num_attention_heads"], kv_heads=c["num_key_value_heads"],
                   expert_intermediate=c["intermediate_size" if mixtral else "moe_intermediate_size"],
                   experts=c["num_local_experts" if mixtral else "num_experts"],
                   top_k=c["num_experts_per_tok"])


def fused_state_dict(arch: MoEArch, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` (published per-expert layout) in the layout transformers' MoE modules hold:
    per layer, ``mlp.experts.gate_up_proj`` [experts, 2 x intermediate, hidden] (every expert's
    gate rows, then its up rows) and ``mlp.experts.down_proj`` [experts, hidden, intermediate];
    Mixtral's ``block_sparse_moe`` becomes ``mlp``."""
    expert = re.compile(r"\.experts\.\d+\.")
    out = {k.replace(f".{arch.mlp}.", ".mlp."): v for k, v in tensors.items() if not expert.search(k)}
    for n in range(arch.layers):
        stack = {role: torch.stack([tensors[arch.expert(n, e, role)] for e in range(arch.experts)])
                 for role in ("gate", "up", "down")}
        out[f"model.layers.{n}.mlp.experts.gate_up_proj"] = torch.cat([stack["gate"], stack["up"]], dim=1)
        out[f"model.layers.{n}.mlp.experts.down_proj"] = stack["down"]
    return out
