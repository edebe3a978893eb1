"""The tiny architecture fixtures are what they claim: real checkpoints, tokenizers and references."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from arch_builder import (ADDS_BOS, BOS, EOS, FAMILIES, LLAMA_LORA_TARGETS, build_model, folded_model,
                          load_reference, reference_generate, reference_nll, sample_text, tiny_config,
                          write_adapter)

transformers = pytest.importorskip("transformers")
PROMPTS = [sample_text(10, seed=1), sample_text(14, seed=2)]
NEW_TOKENS = 12
# Layer-0 tensors as published checkpoints name them (Mixtral: one tensor per expert)
LAYER0 = {
    "mixtral": "model.layers.0.block_sparse_moe.experts.3.w1.weight",
    "phi3": "model.layers.0.self_attn.qkv_proj.weight",
    "qwen3": "model.layers.0.self_attn.q_norm.weight",
    "qwen2": "model.layers.0.self_attn.q_proj.bias",
    "gpt2": "transformer.h.0.attn.c_attn.weight",
    "gpt_neox": "gpt_neox.layers.0.attention.query_key_value.weight",
    "falcon": "transformer.h.0.self_attention.query_key_value.weight",
}
TIED = {"gemma", "gemma2", "gpt2", "falcon", "falcon_alibi"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("archs")
    return {family: build_model(root, family) for family in FAMILIES}


def _file_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_is_the_seeded_model_in_hub_layout(models: dict[str, Path], family: str) -> None:
    torch.manual_seed(0)
    built = transformers.AutoModelForCausalLM.from_config(tiny_config(family, load_reference(
        models[family]).config.vocab_size))
    loaded = load_reference(models[family]).state_dict()
    expected = built.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    names = _file_tensors(models[family]).keys()
    assert LAYER0.get(family.removesuffix("_alibi"), "model.layers.0.input_layernorm.weight") in names
    has_head = any(n.endswith(("lm_head.weight", "embed_out.weight")) for n in names)
    assert has_head == (family not in TIED)  # tied heads are not stored


def test_configs_exercise_each_family() -> None:
    assert tiny_config("mistral").sliding_window == 8
    assert tiny_config("qwen2").layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    g2 = tiny_config("gemma2")
    assert g2.layer_types[:2] == ["sliding_attention", "full_attention"]
    assert (g2.attn_logit_softcapping, g2.final_logit_softcapping) == (4.0, 4.0)
    assert tiny_config("gpt_neox").rope_parameters["partial_rotary_factor"] == 0.25
    assert tiny_config("falcon_alibi").alibi and not tiny_config("falcon").alibi
    assert (tiny_config("mixtral").num_local_experts, tiny_config("mixtral").num_experts_per_tok) == (4, 2)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma2"])
def test_sliding_window_changes_later_positions(models: dict[str, Path], family: str) -> None:
    ids = torch.tensor(_ids(models[family], sample_text(40))[:24])[None]
    windowed = load_reference(models[family])
    no_window = {"sliding_window": None} if family == "mistral" else {"layer_types": ["full_attention"] * 3}
    full = transformers.AutoModelForCausalLM.from_pretrained(
        models[family], attn_implementation=windowed.config._attn_implementation, **no_window).eval()
    with torch.no_grad():
        a, b = windowed(ids).logits[0], full(ids).logits[0]
    torch.testing.assert_close(a[:8], b[:8], rtol=0, atol=1e-5)  # within the window: identical
    assert (a[10:] - b[10:]).abs().max() > 1e-2


def _ids(model_dir: Path, text: str) -> list[int]:
    return transformers.AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"]


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_vocab_and_bos(models: dict[str, Path], family: str) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(models[family])
    config = json.loads((models[family] / "config.json").read_text())
    generation = json.loads((models[family] / "generation_config.json").read_text())
    assert len(tok) == config["vocab_size"] == (567 if family == "qwen2" else 128)
    assert (tok.bos_token_id, tok.eos_token_id, generation["eos_token_id"]) == (BOS, EOS, EOS)
    text = sample_text(300, seed=3)
    ids = tok(text)["input_ids"]
    assert (ids[0] == BOS) == (family in ADDS_BOS) and ids.count(BOS) == (family in ADDS_BOS)
    assert tok.unk_token_id not in ids
    # the word-level tokenizers drop line breaks; Qwen2's byte-level BPE keeps every byte
    decoded = tok.decode(ids, skip_special_tokens=True)
    assert decoded == (text if family == "qwen2" else " ".join(text.split()))


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_nll_equals_hf_loss(models: dict[str, Path], family: str) -> None:
    ids = torch.tensor(_ids(models[family], sample_text(120)))
    windows = [ids[:32], ids[32:64]]
    model = load_reference(models[family])
    for w in windows:
        total, count = reference_nll(models[family], [(w, 1)])
        with torch.no_grad():
            loss = model(w[None], labels=w[None]).loss.item()
        assert count == 31 and total / count == pytest.approx(loss, rel=1e-6)
    # scoring from 5: the loss of labels masked before position 5, over both windows
    total, count = reference_nll(models[family], [(w, 5) for w in windows])
    losses = []
    for w in windows:
        labels = w.clone()[None]
        labels[0, :5] = -100
        with torch.no_grad():
            losses.append(model(w[None], labels=labels).loss.item() * 27)
    assert count == 54 and total == pytest.approx(sum(losses), rel=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_generate_is_greedy_without_cache(models: dict[str, Path], family: str) -> None:
    got = reference_generate(models[family], PROMPTS, NEW_TOKENS)
    model = load_reference(models[family])
    for prompt, new in zip(PROMPTS, got):
        seq = _ids(models[family], prompt)
        expected, gaps = [], []
        with torch.no_grad():
            while len(expected) < NEW_TOKENS and (not expected or expected[-1] != EOS):
                logits = model(torch.tensor(seq + expected)[None]).logits[0, -1]
                top = logits.topk(2).values
                gaps.append((top[0] - top[1]).item())
                expected.append(int(logits.argmax()))
        assert new == expected
        assert min(gaps) > 1e-3  # no near-ties: a correct layer stream cannot flip a token


def test_folded_adapter_is_peft_merge(models: dict[str, Path], tmp_path: Path) -> None:
    from peft import PeftModel

    base = models["llama"]
    adapter = write_adapter(tmp_path, base, seed=5)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and set(config["target_modules"]) >= {"q_proj", "down_proj"}
    lora = _adapter_tensors(adapter)
    assert all(t.abs().sum() > 0 for k, t in lora.items() if "lora_B" in k)
    folded = folded_model(tmp_path, base, adapter)
    # every targeted weight is W + (alpha / r) B A, computed here in float64
    base_w, folded_w = _file_tensors(base), _file_tensors(folded)
    assert folded_w.keys() == base_w.keys()
    scale = config["lora_alpha"] / config["r"]
    a_keys = [k for k in lora if ".lora_A." in k]
    assert len(a_keys) == 7 * 3
    for a_key in a_keys:
        name = a_key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        delta = scale * lora[a_key.replace("lora_A", "lora_B")].double() @ lora[a_key].double()
        expected = (base_w[name].double() + delta).float()
        torch.testing.assert_close(folded_w[name], expected, rtol=1e-6, atol=1e-6)
        assert (folded_w[name] - base_w[name]).abs().max() > 1e-3
    untouched = [k for k in base_w if not any(t in k for t in LLAMA_LORA_TARGETS)]
    assert all(torch.equal(folded_w[k], base_w[k]) for k in untouched)
    ids = torch.tensor(_ids(base, sample_text(30)))[None]
    with torch.no_grad():
        merged = PeftModel.from_pretrained(load_reference(base), adapter).merge_and_unload()(ids).logits
        assert torch.equal(load_reference(folded)(ids).logits, merged)
    assert _ids(folded, "the water") == _ids(base, "the water")


def _adapter_tensors(adapter: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}
