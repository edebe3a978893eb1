"""mergekit's ``chat_template``: ``auto`` (the most common template among the inputs), a built-in
name, or a Jinja template written as is."""

from __future__ import annotations

import json
from collections import Counter
from importlib import resources
from pathlib import Path

from streammerge.errors import CheckpointError

BUILT_IN = ("alpaca", "chatml", "exaone", "llama3", "mistral")


def check_chat_template(value: str) -> str | None:
    """None if ``value`` can name a template, else what would be valid (mergekit's rule: a template
    has at least 20 characters and a '{')."""
    if value == "auto" or value in BUILT_IN or (len(value) >= 20 and "{" in value):
        return None
    return f"got {value!r}, expected 'auto', a built-in template ({', '.join(BUILT_IN)}) or a Jinja template"


def model_chat_template(path: Path) -> str | None:
    """A model's template: ``chat_template.jinja``, else ``tokenizer_config.json``'s ``chat_template``
    (the one named ``default`` when it is a list of named templates)."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = path / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        template = json.loads(config.read_text()).get("chat_template")
    except (json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{config}: not a JSON object ({e})") from None
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def resolve_chat_template(value: str, models: list[Path]) -> str | None:
    """The template text ``value`` stands for; None when ``auto`` finds no input with a template."""
    if value == "auto":
        found = [t.strip() for p in models if (t := model_chat_template(p))]
        return Counter(found).most_common(1)[0][0] if found else None  # equal counts: the first input's
    if value in BUILT_IN:
        return resources.files(__package__).joinpath("chat_templates", f"{value}.jinja").read_text()
    return value
