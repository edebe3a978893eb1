"""The corpus stand-ins are what transformers, PEFT and tokenizers take for the real families:
every tensor a model of the architecture has and no other, a tokenizer of exactly ``vocab_size``
ids with a chat template, and LoRA adapters whose fold PEFT computes as the builder says."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import load_output
from family_builder import FAMILIES, Needs, build, needs

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_standin_loads_as_its_architecture(family: str, tmp_path: Path) -> None:
    roles, loras = frozenset({(family, "base"), (family, "ft1")}), frozenset({(family, "lora1")})
    root = build(tmp_path, Needs(roles, loras, 3, False))
    path = root / "models" / family / "base"
    auto = transformers.AutoModelForCausalLM
    model, info = auto.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert type(model).__name__ == FAMILIES[family].architecture
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensor
    vocab = model.config.vocab_size
    assert model(torch.tensor([[1, 5, vocab - 1]])).logits.shape == (1, 3, vocab)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    assert len(tokenizer) == vocab
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n"
    base, ft = load_output(path), load_output(root / "models" / family / "ft1")
    changed = sum(int((base[k] != ft[k]).sum()) for k in base) / sum(t.numel() for t in base.values())
    assert 0.5 < changed < 0.95  # a fine-tune moves most weights, and leaves some exactly at the base


@pytest.mark.parametrize("family", ["llama", "phi3", "qwen2", "mixtral"])
def test_lora_folds_in_peft_as_built(family: str, tmp_path: Path) -> None:
    from family_builder import write_lora

    root = build(tmp_path, Needs(frozenset({(family, "base")}), frozenset(), 2, False))
    base = load_output(root / "models" / family / "base")
    deltas = write_lora(tmp_path / "lora", family, base, seed=7)
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "models" / family / "base",
                                                              dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(model, tmp_path / "lora").merge_and_unload().state_dict()
    assert deltas and all(n in merged for n in deltas)
    for name, delta in deltas.items():
        assert (merged[name].double() - (base[name].double() + delta)).abs().max() < 1e-6, name


def test_gemma3_multimodal_layout_loads(tmp_path: Path) -> None:
    root = build(tmp_path, Needs(frozenset({("gemma3", "base")}), frozenset(), 2, True))
    model_class = transformers.Gemma3ForConditionalGeneration
    _, info = model_class.from_pretrained(root / "models" / "gemma3" / "base", output_loading_info=True)
    assert not any(info.values()), info


def test_needs_reads_what_a_config_names() -> None:
    text = ("slices:\n- sources:\n  - model: ./models/mistral/ft2\n    layer_range: [0, 40]\n"
            "  - model: ./models/mistral/base+./loras/mistral/lora3\n    layer_range: [0, 40]\n---\n"
            "modules:\n  default:\n    models: [{model: ./intermediates/First}]\n")
    need = needs(text)
    assert need.roles == {("mistral", "ft2"), ("mistral", "base")} and need.loras == {("mistral", "lora3")}
    assert need.layers == 40 and need.vision
