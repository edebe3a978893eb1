"""Tiny stand-ins of published model families in their Hugging Face checkpoint layout.

Each family (Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 text-only and vision-language,
Phi-3, Mixtral, Qwen3-MoE) has the tensor names and config keys of its published checkpoints
(MoE experts as one tensor per expert, as on the Hub, not transformers v5's fused layout) at
tiny dimensions that keep the family's ratios (GQA, head_dim ≠ hidden/heads for Gemma, fused
qkv/gate_up for Phi-3, many small experts for Qwen3-MoE). Values come from
``checkpoint_builder`` (a seeded base, fine-tunes = base + overlapping, conflicting deltas);
every stand-in has a BPE ``tokenizer.json`` whose size is the config's ``vocab_size`` and a
chat template. LoRA adapters are written in PEFT's layout.

The corpus configs name stand-ins as ``./models/<family>/<role>`` (role ``base`` or ``ft<k>``)
and adapters as ``./loras/<family>/lora<k>``; ``build_for`` writes what one config names.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from checkpoint_builder import fine_tunes, random_tensors, write_checkpoint, write_tokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
GEMMA3_IMAGE_TOKENS = ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]
# transformers' Qwen2Tokenizer adds <|endoftext|> (its pad/unk) when a vocabulary lacks it
QWEN_SPECIALS = ("<|endoftext|>",)
MODEL_REF = re.compile(r"\./models/(\w+)/(\w+)")
LORA_REF = re.compile(r"\./loras/(\w+)/(\w+)")


@dataclass(frozen=True)
class Spec:
    """One family: its layout switches, tiny dimensions and published config keys."""

    architecture: str
    model_type: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int = 64
    qkv_bias: bool = False       # Qwen2
    qk_norm: bool = False        # Qwen3, Gemma 3
    sandwich_norms: bool = False  # Gemma 2/3: pre/post feed-forward norms
    fused: bool = False          # Phi-3: qkv_proj and gate_up_proj
    moe: str = ""                # "mixtral" (block_sparse_moe.experts.E.w1/w2/w3) or "qwen" (mlp.experts.E.*)
    experts: int = 0
    tied: bool = False
    specials: tuple[str, ...] = ()  # added tokens the family's tokenizer class insists on
    extra: dict = field(default_factory=dict)

    def layer_shapes(self, p: str) -> dict[str, tuple[int, ...]]:
        h, i = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        a = p + "self_attn."
        out: dict[str, tuple[int, ...]] = {p + "input_layernorm.weight": (h,)}
        if self.fused:
            out[a + "qkv_proj.weight"] = (q + 2 * kv, h)
        else:
            out |= {a + "q_proj.weight": (q, h), a + "k_proj.weight": (kv, h), a + "v_proj.weight": (kv, h)}
        if self.qkv_bias:
            out |= {a + "q_proj.bias": (q,), a + "k_proj.bias": (kv,), a + "v_proj.bias": (kv,)}
        if self.qk_norm:
            out |= {a + "q_norm.weight": (self.head_dim,), a + "k_norm.weight": (self.head_dim,)}
        out[a + "o_proj.weight"] = (h, q)
        out[p + "post_attention_layernorm.weight"] = (h,)
        if self.sandwich_norms:
            out |= {p + "pre_feedforward_layernorm.weight": (h,),
                    p + "post_feedforward_layernorm.weight": (h,)}
        if self.moe == "mixtral":
            m = p + "block_sparse_moe."
            out[m + "gate.weight"] = (self.experts, h)
            for e in range(self.experts):
                x = f"{m}experts.{e}."
                out |= {x + "w1.weight": (i, h), x + "w2.weight": (h, i), x + "w3.weight": (i, h)}
        elif self.moe == "qwen":
            out[p + "mlp.gate.weight"] = (self.experts, h)
            for e in range(self.experts):
                out |= self._gated(f"{p}mlp.experts.{e}.")
        elif self.fused:
            out |= {p + "mlp.gate_up_proj.weight": (2 * i, h), p + "mlp.down_proj.weight": (h, i)}
        else:
            out |= self._gated(p + "mlp.")
        return out

    def _gated(self, x: str) -> dict[str, tuple[int, ...]]:
        h, i = self.hidden, self.intermediate
        return {x + "gate_proj.weight": (i, h), x + "up_proj.weight": (i, h), x + "down_proj.weight": (h, i)}

    def shapes(self, layers: int) -> dict[str, tuple[int, ...]]:
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, self.hidden)}
        for n in range(layers):
            out |= self.layer_shapes(f"model.layers.{n}.")
        out["model.norm.weight"] = (self.hidden,)
        if not self.tied:
            out["lm_head.weight"] = (self.vocab, self.hidden)
        return out

    def config(self, layers: int) -> dict:
        return {
            "architectures": [self.architecture], "model_type": self.model_type, "hidden_size": self.hidden,
            "intermediate_size": self.intermediate, "num_hidden_layers": layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab, "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": self.tied, "bos_token_id": 1, "eos_token_id": 2, **self.extra,
        }

    @property
    def lora_targets(self) -> list[str]:
        if self.fused:
            return ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
        attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
        return attention if self.moe else attention + ["gate_proj", "up_proj", "down_proj"]


# Published ratios, shrunk: Llama 3 8B (32 heads / 8 kv, MLP 3.5x), Mistral 7B (same), Qwen2.5 7B
# (biases, MLP 5.3x), Qwen3 8B (q/k norms), Gemma 2 9B / Gemma 3 (head_dim·heads ≠ hidden, tied,
# sandwich norms, MLP 4x), Phi-3 mini (no GQA, fused), Mixtral 8x7B (top-2 of 8 experts, here 4),
# Qwen3-30B-A3B (many small experts, top-8 of 128, here top-2 of 8).
FAMILIES: dict[str, Spec] = {
    "llama": Spec("LlamaForCausalLM", "llama", 16, 56, 4, 1, 4,
                  extra={"hidden_act": "silu", "rope_theta": 500000.0, "attention_bias": False,
                         "mlp_bias": False}),
    "mistral": Spec("MistralForCausalLM", "mistral", 16, 56, 4, 1, 4,
                    extra={"hidden_act": "silu", "rope_theta": 1000000.0, "sliding_window": None}),
    "qwen2": Spec("Qwen2ForCausalLM", "qwen2", 16, 80, 4, 2, 4, qkv_bias=True, specials=QWEN_SPECIALS,
                  extra={"hidden_act": "silu", "rope_theta": 1000000.0, "use_sliding_window": False,
                         "sliding_window": None, "max_window_layers": 28}),
    "qwen3": Spec("Qwen3ForCausalLM", "qwen3", 16, 48, 4, 1, 8, qk_norm=True, specials=QWEN_SPECIALS,
                  extra={"hidden_act": "silu", "rope_theta": 1000000.0, "attention_bias": False,
                         "use_sliding_window": False, "sliding_window": None}),
    "gemma2": Spec("Gemma2ForCausalLM", "gemma2", 16, 64, 4, 2, 8, sandwich_norms=True, tied=True,
                   extra={"hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 8,
                          "sliding_window": 64, "final_logit_softcapping": 30.0,
                          "attn_logit_softcapping": 50.0, "pad_token_id": 0}),
    "gemma3": Spec("Gemma3ForCausalLM", "gemma3_text", 16, 64, 4, 2, 8, qk_norm=True,
                   sandwich_norms=True, tied=True,

                   vocab=64, extra={"hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 8,
                                    "sliding_window": 64, "rope_theta": 1000000.0, "pad_token_id": 0}),
    "phi3": Spec("Phi3ForCausalLM", "phi3", 16, 48, 4, 4, 4, fused=True,
                 extra={"hidden_act": "silu", "rope_theta": 10000.0, "original_max_position_embeddings": 128,
                        "pad_token_id": 0, "sliding_window": None}),
    "mixtral": Spec("MixtralForCausalLM", "mixtral", 16, 32, 4, 1, 4, moe="mixtral", experts=4,
                    extra={"hidden_act": "silu", "rope_theta": 1000000.0, "num_local_experts": 4,
                           "num_experts_per_tok": 2, "sliding_window": None, "router_aux_loss_coef": 0.02}),
    "qwen3_moe": Spec("Qwen3MoeForCausalLM", "qwen3_moe", 16, 8, 4, 1, 4, qk_norm=True, moe="qwen", experts=8,
                      specials=QWEN_SPECIALS,
                      extra={"hidden_act": "silu", "rope_theta": 1000000.0, "num_experts": 8,
                             "num_experts_per_tok": 2,
                             "moe_intermediate_size": 8, "decoder_sparse_step": 1, "mlp_only_layers": [],
                             "norm_topk_prob": True, "attention_bias": False, "use_sliding_window": False}),
}
# Gemma 3 4B and up as published: Gemma3ForConditionalGeneration, the text model under
# `language_model.`, a SigLIP vision tower and the multimodal projector (what `modules:` merges).
VISION = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_channels": 3,
          "image_size": 16, "patch_size": 4, "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh",
          "vision_use_head": False, "model_type": "siglip_vision_model"}


def vision_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    v, i, p = VISION["hidden_size"], VISION["intermediate_size"], VISION["patch_size"]
    pre = "vision_tower.vision_model."
    out: dict[str, tuple[int, ...]] = {
        pre + "embeddings.patch_embedding.weight": (v, VISION["num_channels"], p, p),
        pre + "embeddings.patch_embedding.bias": (v,),
        pre + "embeddings.position_embedding.weight": ((VISION["image_size"] // p) ** 2, v),
    }
    for n in range(layers):
        x = f"{pre}encoder.layers.{n}."
        for norm in ("layer_norm1", "layer_norm2"):
            out |= {f"{x}{norm}.weight": (v,), f"{x}{norm}.bias": (v,)}
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out |= {f"{x}self_attn.{proj}.weight": (v, v), f"{x}self_attn.{proj}.bias": (v,)}
        out |= {x + "mlp.fc1.weight": (i, v), x + "mlp.fc1.bias": (i,),
                x + "mlp.fc2.weight": (v, i), x + "mlp.fc2.bias": (v,)}
    out |= {pre + "post_layernorm.weight": (v,), pre + "post_layernorm.bias": (v,)}
    text = FAMILIES["gemma3"].hidden
    return out | {"multi_modal_projector.mm_input_projection_weight": (v, text),
                  "multi_modal_projector.mm_soft_emb_norm.weight": (v,)}


def layout(family: str, layers: int, vision: bool = False) -> tuple[dict[str, tuple[int, ...]], dict]:
    """Tensor shapes and config.json of one stand-in (``vision``: Gemma 3's multimodal layout)."""
    spec = FAMILIES[family]
    if not vision:
        return spec.shapes(layers), spec.config(layers)
    assert family == "gemma3", family
    image_ids = {t: spec.vocab - len(GEMMA3_IMAGE_TOKENS) + k for k, t in enumerate(GEMMA3_IMAGE_TOKENS)}
    shapes = {"language_model." + k: s for k, s in spec.shapes(layers).items()} | vision_shapes(layers)
    text = {k: v for k, v in spec.config(layers).items() if k != "architectures"}
    config = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
              "text_config": text, "vision_config": VISION | {"num_hidden_layers": layers},
              "mm_tokens_per_image": 4, "boi_token_index": image_ids["<start_of_image>"],
              "eoi_token_index": image_ids["<end_of_image>"],
              "image_token_index": image_ids["<image_soft_token>"],
              "tie_word_embeddings": True}
    return shapes, config


def _tokens(vocab: int, added: int) -> list[str]:
    """``vocab - added`` BPE tokens: specials (ids 0-2: unk, bos, eos), letters, then letter pairs."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pairs = [a + b for a in "etaoinshrd" for b in "etaoinshrd"]
    tokens = ["<unk>", "<s>", "</s>", *letters, *pairs][: vocab - added]
    assert len(tokens) == vocab - added, vocab
    return tokens


def write_standin(path: Path, family: str, tensors: dict[str, torch.Tensor], config: dict,
                  dtype: torch.dtype, vision: bool = False) -> Path:
    """A checkpoint with a tokenizer of exactly ``vocab_size`` ids and a ChatML template."""
    write_checkpoint(path, tensors, config, dtype=dtype)
    added = [*FAMILIES[family].specials, *CHAT_TOKENS, *(GEMMA3_IMAGE_TOKENS if vision else [])]
    write_tokenizer(path, _tokens(FAMILIES[family].vocab, len(added)), [(t, True) for t in added], CHATML)
    config_file = path / "tokenizer_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text())
                                      | {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return path


def write_lora(path: Path, family: str, base: dict[str, torch.Tensor], seed: int, rank: int = 4,
               alpha: int = 8, base_path: str = "") -> dict[str, torch.Tensor]:
    """A PEFT LoRA adapter on every linear layer of the family's decoder; returns the ΔW per weight
    (alpha/rank · B·A, float64) that folding it must add."""
    spec = FAMILIES[family]
    g = torch.Generator().manual_seed(seed)
    factors, deltas = {}, {}
    for name, w in base.items():
        module = name.removesuffix(".weight")
        if w.dim() != 2 or module.rsplit(".", 1)[-1] not in spec.lora_targets:
            continue
        a = 0.05 * torch.randn((rank, w.shape[1]), generator=g, dtype=torch.float64)
        b = 0.05 * torch.randn((w.shape[0], rank), generator=g, dtype=torch.float64)
        key = f"base_model.model.{module}"
        factors |= {f"{key}.lora_A.weight": a.float(), f"{key}.lora_B.weight": b.float()}
        deltas[name] = alpha / rank * (b.float().double() @ a.float().double())
    path.mkdir(parents=True, exist_ok=True)
    save_file(factors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
              "lora_dropout": 0.0, "target_modules": spec.lora_targets, "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False,
              "base_model_name_or_path": base_path, "inference_mode": True}
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return deltas


def family_seed(family: str) -> int:
    return sorted(FAMILIES).index(family) * 100


@dataclass(frozen=True)
class Needs:
    """What one config needs on disk: roles per family, adapters per family, the layer count and
    whether Gemma 3 is the multimodal checkpoint (a ``modules:`` config)."""

    roles: frozenset[tuple[str, str]]
    loras: frozenset[tuple[str, str]]
    layers: int
    vision: bool


def _layer_ends(node: object) -> list[int]:
    if isinstance(node, dict):
        ends = [int(node["layer_range"][1])] if "layer_range" in node else []
        return ends + [e for v in node.values() for e in _layer_ends(v)]
    if isinstance(node, list):
        return [e for v in node for e in _layer_ends(v)]
    return []


def needs(config_text: str, min_layers: int = 4) -> Needs:
    documents = [d for d in yaml.safe_load_all(config_text) if d]
    ends = [e for d in documents for e in _layer_ends(d)]
    return Needs(frozenset(MODEL_REF.findall(config_text)), frozenset(LORA_REF.findall(config_text)),
                 max([min_layers, *ends]), any("modules" in d for d in documents))


def build(root: Path, need: Needs, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the stand-ins ``need`` names under ``root`` (``models/<family>/<role>``,
    ``loras/<family>/<name>``); every adapter's base is the family's ``base``."""
    families = {f for f, _ in need.roles | need.loras}
    for family in sorted(families):
        unknown = {r for f, r in need.roles if f == family and not re.fullmatch(r"base|ft\d+", r)}
        assert not unknown and family in FAMILIES, (family, unknown)
        shapes, config = layout(family, need.layers, need.vision and family == "gemma3")
        seed, vision = family_seed(family), need.vision and family == "gemma3"
        base = random_tensors(shapes, seed)
        fts = max([int(r[2:]) for f, r in need.roles if f == family and r != "base"], default=0)
        roles = [("base", base)] + [(f"ft{k + 1}", t) for k, t in enumerate(fine_tunes(base, fts, seed + 1))]
        for role, tensors in roles:
            write_standin(root / "models" / family / role, family, tensors, config, dtype, vision)
        for f, name in sorted(need.loras):
            if f == family:
                write_lora(root / "loras" / family / name, family, base,
                           seed + 50 + int(name.removeprefix("lora")),
                           base_path=f"./models/{family}/base")


    return root


def build_corpus(root: Path, configs: dict[str, str]) -> dict[str, Path]:
    """A working directory per config (name → YAML text) under ``root``, whose ``models`` and
    ``loras`` link to stand-ins shared by the configs of one layer count and layout (built once,
    holding the union of what those configs name); intermediates a run writes stay per config."""
    wanted = {name: needs(text) for name, text in configs.items()}
    groups: dict[tuple[int, bool], list[str]] = {}
    for name, need in wanted.items():
        groups.setdefault((need.layers, need.vision), []).append(name)
    where = {}
    for (layers, vision), names in sorted(groups.items()):
        union = Needs(frozenset().union(*(wanted[n].roles for n in names)),
                      frozenset().union(*(wanted[n].loras for n in names)), layers, vision)
        shared = build(root / "standins" / f"layers{layers}{'-vl' if vision else ''}", union)
        for name in names:
            where[name] = root / "runs" / name
            where[name].mkdir(parents=True)
            for sub in ("models", "loras"):
                if (shared / sub).is_dir():
                    (where[name] / sub).symlink_to(shared / sub, target_is_directory=True)
    return where
