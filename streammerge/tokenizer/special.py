"""A tokenizer's special tokens: its added tokens marked special, and the bos/eos/pad/unk tokens
its ``tokenizer_config.json`` or ``special_tokens_map.json`` names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def _content(value: Any) -> str | None:
    """A role's token as the config gives it: a string, or an AddedToken dict with ``content``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def special_tokens(tokenizer_json: str, directory: Path) -> list[str]:
    """The special tokens of ``tokenizer_json`` (its text) and of the configs in ``directory``, in
    that order, without repeats."""
    tokens = [e["content"] for e in json.loads(tokenizer_json).get("added_tokens", []) if e.get("special")]
    for name in CONFIG_FILES:
        file = directory / name
        config = json.loads(file.read_text()) if file.is_file() else {}
        if isinstance(config, dict):
            tokens += [t for role in ROLES if (t := _content(config.get(role))) is not None]
    return list(dict.fromkeys(tokens))
