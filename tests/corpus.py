"""The corpus of published mergekit configs (tests/data/corpus): its configs, what each one's
goldens are and how its comparison is pinned (``expect.json``)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

CORPUS = Path(__file__).parent / "data" / "corpus"
EXPECT = CORPUS / "expect.json"
RANDOM_METHODS = {"dare_ties", "dare_linear", "della", "della_linear"}
TOKENIZER_KEYS = {"tokenizer", "tokenizer_source", "chat_template"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")

CLASSES = ("exact", "tie_order", "sum_order", "statistical", "refused")


def configs() -> dict[str, Path]:
    return {p.stem: p for p in sorted((CORPUS / "configs").glob("*.yml"))}


def documents(config: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(config.read_text(encoding="utf-8")) if isinstance(d, dict)]


def is_multi(config: Path) -> bool:
    return len(documents(config)) > 1


def is_random(config: Path) -> bool:
    return any(d.get("merge_method") in RANDOM_METHODS for d in documents(config))


def builds_tokenizer(config: Path) -> bool:
    return any(TOKENIZER_KEYS & d.keys() for d in documents(config))


def base_model(config: Path) -> str | None:
    """The last document's ``base_model`` without an adapter (the point random merges' task vectors
    are measured from)."""
    base = documents(config)[-1].get("base_model")
    return base.split("+")[0] if isinstance(base, str) else None


def load_expect() -> dict[str, dict]:
    return json.loads(EXPECT.read_text()) if EXPECT.is_file() else {}


def save_expect(expect: dict[str, dict]) -> None:
    EXPECT.write_text(json.dumps(dict(sorted(expect.items())), indent=1) + "\n")
