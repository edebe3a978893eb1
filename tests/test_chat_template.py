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


SYSTEM, USER = {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": " hello \n"}  # surrounding blanks: some templates trim
CONVERSATIONS = {"u": [USER], "su": [SYSTEM, USER], "sua": [SYSTEM, USER, ASSISTANT],
                 "suau": [SYSTEM, USER, ASSISTANT, {"role": "user", "content": "and?"}]}
# What mergekit 0.1.5's built-in templates render for CONVERSATIONS through transformers (bos <s>,
# eos </s>): (without, with the generation prompt). Quirks kept: alpaca starts with a blank line
# without a system message and puts its generation prompt right after the last turn; exaone's
# lines carry its template's indentation; mistral has no generation prompt.
RENDERED = {
    "alpaca": {
        "u": ('\n\n### Instruction:\nhi',
                '\n\n### Instruction:\nhi### Response:\n'),
        "su": ('Be brief.\n\n### Instruction:\nhi',
                'Be brief.\n\n### Instruction:\nhi### Response:\n'),
        "sua": ('Be brief.\n\n### Instruction:\nhi\n\n### Response:\nhello',) * 2,
        "suau": ('Be brief.\n\n### Instruction:\nhi\n\n### Response:\nhello\n\n### Instruction:\nand?',
                'Be brief.\n\n### Instruction:\nhi\n\n### Response:\nhello\n\n### Instruction:\n'
                'and?### Response:\n'),
    },
    "chatml": {
        "u": ('<|im_start|>user\nhi<|im_end|>\n',
                '<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n'),
        "su": ('<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n',
                '<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n'
                '<|im_start|>assistant\n'),
        "sua": ('<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n'
                '<|im_start|>assistant\n hello \n<|im_end|>\n',
                '<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n'
                '<|im_start|>assistant\n hello \n<|im_end|>\n<|im_start|>assistant\n'),
        "suau": ('<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n'
                '<|im_start|>assistant\n hello \n<|im_end|>\n<|im_start|>user\nand?<|im_end|>\n',
                '<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n'
                '<|im_start|>assistant\n hello \n<|im_end|>\n<|im_start|>user\nand?<|im_end|>\n'
                '<|im_start|>assistant\n'),
    },
    "exaone": {
        "u": ('        [|system|][|endofturn|]\n\n    [|user|]hi\n        \n\n',
                '        [|system|][|endofturn|]\n\n    [|user|]hi\n        \n\n    [|assistant|]\n'),
        "su": ('    [|system|]Be brief.\n        [|endofturn|]\n\n    [|user|]hi\n        \n\n',
                '    [|system|]Be brief.\n        [|endofturn|]\n\n    [|user|]hi\n        \n\n'
                '    [|assistant|]\n'),
        "sua": ('    [|system|]Be brief.\n        [|endofturn|]\n\n    [|user|]hi\n        \n\n'
                '    [|assistant|] hello \n\n        [|endofturn|]\n\n',
                '    [|system|]Be brief.\n        [|endofturn|]\n\n    [|user|]hi\n        \n\n'
                '    [|assistant|] hello \n\n        [|endofturn|]\n\n    [|assistant|]\n'),
        "suau": ('    [|system|]Be brief.\n        [|endofturn|]\n\n    [|user|]hi\n        \n\n'
                '    [|assistant|] hello \n\n        [|endofturn|]\n\n    [|user|]and?\n        \n\n',
                '    [|system|]Be brief.\n        [|endofturn|]\n\n    [|user|]hi\n        \n\n'
                '    [|assistant|] hello \n\n        [|endofturn|]\n\n    [|user|]and?\n        \n\n'
                '    [|assistant|]\n'),
    },
    "llama3": {
        "u": ('<s><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>\n',
                '<s><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>\n'
                '<|start_header_id|>assistant<|end_header_id|>\n\n'),
        "su": ('<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\n'
                '<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>\n',
                '<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\n'
                '<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>\n'
                '<|start_header_id|>assistant<|end_header_id|>\n\n'),
        "sua": ('<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\n'
                '<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>\n'
                '<|start_header_id|>assistant<|end_header_id|>\n\nhello<|eot_id|>\n',
                '<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\n'
                '<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>\n'
                '<|start_header_id|>assistant<|end_header_id|>\n\nhello<|eot_id|>\n'
                '<|start_header_id|>assistant<|end_header_id|>\n\n'),
        "suau": ('<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\n'
                '<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>\n'
                '<|start_header_id|>assistant<|end_header_id|>\n\nhello<|eot_id|>\n'
                '<|start_header_id|>user<|end_header_id|>\n\nand?<|eot_id|>\n',
                '<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\n'
                '<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>\n'
                '<|start_header_id|>assistant<|end_header_id|>\n\nhello<|eot_id|>\n'
                '<|start_header_id|>user<|end_header_id|>\n\nand?<|eot_id|>\n'
                '<|start_header_id|>assistant<|end_header_id|>\n\n'),
    },
    "mistral": {
        "u": ('<s> [INST] hi [/INST]',) * 2,
        "su": ('<s> [INST] Be brief.\n\nhi [/INST]',) * 2,
        "sua": ('<s> [INST] Be brief.\n\nhi [/INST]  hello \n</s>',) * 2,
        "suau": ('<s> [INST] Be brief.\n\nhi [/INST]  hello \n</s> [INST] and? [/INST]',) * 2,
    },
}


def _tokenizer(name: str, templated: list[Path], out: Path):  # -> transformers' tokenizer
    from transformers import AutoTokenizer

    _merge(templated[:1], out, chat_template=name)
    return AutoTokenizer.from_pretrained(out)


@pytest.mark.parametrize("name", BUILT_IN)
def test_built_in_templates_render_as_mergekits(name: str, templated: list[Path], tmp_path: Path) -> None:
    tok = _tokenizer(name, templated, tmp_path / "out")
    for conversation, expected in RENDERED[name].items():
        messages = CONVERSATIONS[conversation]
        got = tuple(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
                    for prompt in (False, True))
        assert got == expected, conversation


def test_alpaca_edge_cases_as_mergekits(templated: list[Path], tmp_path: Path) -> None:
    """The last system message wins, user_context is an Input, a system message alone is a prefix."""
    tok = _tokenizer("alpaca", templated, tmp_path / "out")
    messages = [SYSTEM, USER, {"role": "user_context", "content": " ctx "},
                {"role": "system", "content": "Last."}]
    assert (tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == "Last.\n\n### Instruction:\nhi\n\n### Input:\nctx\n\n### Response:\n")
    alone = tok.apply_chat_template([SYSTEM], tokenize=False, add_generation_prompt=True)
    assert alone == "Be brief.\n\n### Response:\n"


def test_mistral_refuses_roles_out_of_turn(templated: list[Path], tmp_path: Path) -> None:
    from jinja2.exceptions import TemplateError

    tok = _tokenizer("mistral", templated, tmp_path / "out")
    with pytest.raises(TemplateError, match="roles must alternate user/assistant"):
        tok.apply_chat_template([ASSISTANT], tokenize=False)
    with pytest.raises(TemplateError, match="Only user and assistant roles are supported"):
        tok.apply_chat_template([USER, ASSISTANT, USER, SYSTEM], tokenize=False)


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
