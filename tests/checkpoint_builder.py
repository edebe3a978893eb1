"""Tiny Llama-layout checkpoints in the real Hugging Face format, for tests.

Written with ``safetensors.torch.save_file`` (not with streammerge's own writer), with a
``config.json`` that transformers can load and a small tokenizer config to be copied.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class Arch:
    hidden: int = 32
    intermediate: int = 64
    layers: int = 3
    vocab: int = 96
    heads: int = 4
    kv_heads: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def shapes(self) -> dict[str, tuple[int, ...]]:
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h)}
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out |= {
                p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
                p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            }
        return out | {"model.norm.weight": (h,), "lm_head.weight": (self.vocab, h)}

    def config(self, dtype: torch.dtype) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
            "intermediate_size": self.intermediate, "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab, "max_position_embeddings": 64,
            "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False,
            "torch_dtype": str(dtype).removeprefix("torch."), "bos_token_id": 1, "eos_token_id": 2,
        }


def base_tensors(arch: Arch, seed: int = 0) -> dict[str, torch.Tensor]:
    return random_tensors(arch.shapes(), seed)


def random_tensors(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Float64 weights of a plausible scale: vectors (norms) near 1, matrices N(0, 0.02²)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            out[name] = 1 + 0.05 * torch.randn(shape, generator=g, dtype=torch.float64)
        else:
            out[name] = 0.02 * torch.randn(shape, generator=g, dtype=torch.float64)
    return out


def fine_tunes(base: dict[str, torch.Tensor], n: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """``n`` fine-tunes whose task vectors overlap (a shared component) and conflict (sign flips in
    the second), with some entries left exactly at the base value."""
    g = torch.Generator().manual_seed(seed)
    models = []
    shared = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in base.items()}
    for m in range(n):
        ft = {}
        for k, b in base.items():
            z = 0.7 * shared[k] + 0.7 * torch.randn(b.shape, generator=g, dtype=torch.float64)
            if m == 1:
                z = torch.where(torch.rand(b.shape, generator=g) < 0.3, -z, z)
            z = torch.where(torch.rand(b.shape, generator=g) < 0.1, torch.zeros_like(z), z)
            ft[k] = b + 0.003 * z
        models.append(ft)
    return models


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], config: dict, shards: int = 1,
                     dtype: torch.dtype = torch.float32, tokenizer: bool = True) -> Path:
    """Write ``tensors`` (cast to ``dtype``) as ``model.safetensors`` or ``shards`` index-linked shards."""
    path.mkdir(parents=True, exist_ok=True)
    cast = {k: v.to(dtype).contiguous() for k, v in tensors.items()}
    (path / "config.json").write_text(json.dumps({**config, "torch_dtype": str(dtype).removeprefix("torch.")}, indent=2))
    if tokenizer:
        (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64, "marker": path.name}))
        (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    names = list(cast)
    if shards == 1:
        save_file(cast, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    per = -(-len(names) // shards)
    weight_map = {}
    for k in range(shards):
        part = names[k * per : (k + 1) * per]
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: cast[n] for n in part}, str(path / fname), metadata={"format": "pt"})
        weight_map |= {n: fname for n in part}
    total = sum(t.numel() * t.element_size() for t in cast.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return path


@dataclass(frozen=True)
class Family:
    """A base and fine-tunes on disk, with their exact values (as stored) in memory."""

    base: Path
    models: list[Path]
    tensors: dict[Path, dict[str, torch.Tensor]]
    arch: Arch


def write_family(root: Path, arch: Arch = Arch(), n: int = 3, dtype: torch.dtype = torch.float32,
                 shards: int = 1, seed: int = 0) -> Family:
    base = base_tensors(arch, seed)
    fts = fine_tunes(base, n, seed + 1)
    config = arch.config(dtype)
    paths = [write_checkpoint(root / "base", base, config, shards, dtype)]
    paths += [write_checkpoint(root / f"ft{i + 1}", ft, config, shards, dtype) for i, ft in enumerate(fts)]
    stored = {p: {k: v.to(dtype) for k, v in t.items()} for p, t in zip(paths, [base, *fts])}
    return Family(paths[0], paths[1:], stored, arch)


def write_tokenizer(path: Path, tokens: list[str], added: list[tuple[str, bool]] = (), chat_template: str | None = None) -> None:
    """A BPE ``tokenizer.json`` over ``tokens`` (ids in order; a token "xy" merges "x" and "y" when both
    are tokens), then ``added`` tokens ``(content, special)`` with the next ids, and a
    ``tokenizer_config.json`` transformers loads (keeping the one ``write_checkpoint`` wrote)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [(t[0], t[1:]) for t in tokens if len(t) > 1 and t[0] in vocab and t[1:] in vocab]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    for content, special in added:
        (tok.add_special_tokens if special else tok.add_tokens)([AddedToken(content, special=special, normalized=not special)])
    tok.save(str(path / "tokenizer.json"))
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["added_tokens_decoder"] = {str(e["id"]): {k: v for k, v in e.items() if k != "id"}
                                      for e in json.loads(tok.to_str())["added_tokens"]}
    if chat_template is not None:
        config["chat_template"] = chat_template
    config_file.write_text(json.dumps(config))
