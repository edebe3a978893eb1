"""chat_template: auto, built-in names and literal templates, written where transformers reads them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import streammerge
from checkpoint_builder import Arch, Family, base_tensors, write_checkpoint, write_tokenizer
from streammerge.tokenizer.chat_template import BUILT_IN

ARCH = Arch(layers=1)
TOKENS = list("abcdefghij")
CHATML = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
OTHER = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def templated(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three models whose tokenizers carry templates OTHER, CHATML, CHATML."""
    root = tmp_path_factory.mktemp("chat")
    paths = []
    for i, template in enumerate([OTHER, CHATML, CHATML]):
        path = write_checkpoint(root / f"m{i}", base_tensors(ARCH, seed=i), ARCH.config(torch.float32))
        write_tokenizer(path, TOKENS, [("<s>", True), ("</s>", True)], chat_template=template)
        config = json.loads((path / "tokenizer_config.json").read_text())
        (path / "tokenizer_config.json").write_text(json.dumps(config | {"bos_token": "<s>", "eos_token": "</s>"}))
        paths.append(path)
    return paths


def _merge(models: list[Path], out: Path, **extra) -> dict:
    streammerge.merge({"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 1}} for m in models]} | extra,
                      out, quiet=True)
    return json.loads((out / "tokenizer_config.json").read_text())


def _loaded_template(out: Path) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(out).chat_template


def test_auto_takes_the_most_common_template(templated: list[Path], tmp_path: Path) -> None:
    config = _merge(templated, tmp_path / "out", chat_template="auto")
    assert config["chat_template"] == CHATML.strip() == (tmp_path / "out" / "chat_template.jinja").read_text()
    assert _loaded_template(tmp_path / "out") == CHATML.strip()
    assert config["marker"] == "m0"  # the rest of the donor's tokenizer_config.json is kept


@pytest.mark.parametrize("name", BUILT_IN)
def test_built_in_templates_render(name: str, templated: list[Path], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    _merge(templated[:1], tmp_path / "out", chat_template=name)
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                                    {"role": "assistant", "content": "Hello"}], tokenize=False)
    assert "Hi there" in text and "Hello" in text and text != "Hi thereHello"
    if name == "chatml":
        assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>")


def test_literal_template_with_a_built_tokenizer(templated: list[Path], tmp_path: Path) -> None:
    literal = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
    config = _merge(templated, tmp_path / "out", chat_template=literal, tokenizer_source="union")
    assert config["chat_template"] == literal and _loaded_template(tmp_path / "out") == literal
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_auto_without_templates_keeps_the_donor_files(fp32_family: Family, tmp_path: Path) -> None:
    streammerge.merge({"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 1}} for m in fp32_family.models],
                       "chat_template": "auto"}, tmp_path / "out", quiet=True)
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert "chat_template" not in config and not (tmp_path / "out" / "chat_template.jinja").exists()
