"""The output vocabulary, built as mergekit builds it (``tokenizer/build.py``), from each input's
``tokenizer.json`` through the ``tokenizers`` package.

Each input's vocabulary keeps only the ids below its ``config.json`` ``vocab_size``, the rows its
embeddings hold. The output vocabulary is the base's (or the first model's) so stripped
(``base``), a named model's tokenizer whole (a model), or (``union``) the stripped base tokenizer
extended with every other input's regular tokens it lacks, then with every input's added tokens
(the first settings of a token win); inputs in plan order, each in id order (mergekit walks hash
order). Tokens named in ``tokenizer.tokens`` that no vocabulary has are appended last.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers

from streammerge.errors import CheckpointError
from streammerge.io.reader import Checkpoint
from streammerge.plan.schema import TokenizerSpec

TOKENIZER_JSON = "tokenizer.json"


@dataclass(frozen=True)
class Vocabulary:
    """The output tokenizer and, per input checkpoint (``Schedule.checkpoints`` index), where each token sits."""

    tokenizer_json: str
    tokens: tuple[str, ...]  # the token of each output id
    rows: int  # embedding rows: len(tokens), padded up to a multiple of pad_to_multiple_of
    inputs: dict[int, dict[str, int]]  # token -> row, for the ids below the input's vocab_size
    originals: dict[int, dict[str, int]]  # the input's whole vocabulary (for model_token sources)
    donor: Path  # the model whose tokenizer_config.json and special tokens map are kept

    @property
    def ids(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tokens)}


def _load(path: Path) -> Any:
    file = path / TOKENIZER_JSON
    if not file.is_file():
        return None
    try:
        return tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust parser raises its own exception type
        raise CheckpointError(f"{file}: not a tokenizers tokenizer.json ({str(e).splitlines()[0]})") from None


def _vocab_size(ckpt: Checkpoint, tokenizer: Any) -> int:
    config = ckpt.config()
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(size) if size else tokenizer.get_vocab_size(with_added_tokens=True)


def _stripped(tokenizer: Any, size: int, path: Path) -> Any:
    """``tokenizer`` without the ids at or past ``size`` (tokens the model has no embedding row for)."""
    unused = {t for t, i in tokenizer.get_vocab(with_added_tokens=True).items() if i >= size}
    if not unused:
        return tokenizer
    data = json.loads(tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise CheckpointError(f"{path / TOKENIZER_JSON}: has {len(unused)} tokens past config vocab_size {size}, and only BPE "
                              f"tokenizers can be cut down (this one is {data['model']['type']})")
    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < size]
    data["model"]["vocab"] = {t: i for t, i in data["model"]["vocab"].items() if i < size}
    data["model"]["merges"] = [m for m in data["model"]["merges"]
                               if not unused.intersection(m.split(" ") if isinstance(m, str) else m)]
    return tokenizers.Tokenizer.from_str(json.dumps(data))


def _settings(token: Any) -> tuple:
    return (token.content, token.single_word, token.lstrip, token.rstrip, token.normalized, token.special)


def _add(tokenizer: Any, token: Any) -> None:
    (tokenizer.add_special_tokens if getattr(token, "special", False) else tokenizer.add_tokens)([token])


def _union(base: Any, inputs: list[tuple[Any, int]], notes: list[str]) -> Any:
    out = tokenizers.Tokenizer.from_str(base.to_str())
    have = out.get_vocab(with_added_tokens=True)
    regular: dict[str, None] = {}
    added: dict[str, Any] = {}
    for tokenizer, size in inputs:
        decoder = tokenizer.get_added_tokens_decoder()
        own_added = {t.content for t in decoder.values()}
        for token, i in sorted(tokenizer.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1]):
            if i < size and token not in own_added:
                regular.setdefault(token)
        for i, info in sorted(decoder.items()):
            if i >= size:
                continue
            if info.content not in added:
                added[info.content] = info
            elif _settings(added[info.content]) != _settings(info):
                notes.append(f"tokenizer: added token {info.content!r} has different settings in two inputs; the first input's kept")
    for token in regular:
        if token not in added and token not in have:
            out.add_tokens([token])
    for info in added.values():
        _add(out, info)
    return out


def build_vocabulary(spec: TokenizerSpec, checkpoints: tuple[Checkpoint, ...], base: int, required: bool,
                     notes: list[str]) -> Vocabulary | None:
    """The output vocabulary of ``spec`` over ``checkpoints`` (``base``: the base's index, else the
    first model's). Without ``required`` (a bare ``tokenizer_source: base`` or model) a donor with no
    tokenizer.json gives None: its tokenizer files are copied and the embeddings are not remapped."""
    donor = checkpoints[base].path if spec.source in ("base", "union") else Path(spec.source)
    if not (donor / TOKENIZER_JSON).is_file():
        if required or spec.source == "union":
            raise CheckpointError(f"{donor}: no {TOKENIZER_JSON}, which tokenizer {spec.source!r} is built from "
                                  "(streammerge reads fast tokenizers only)")
        notes.append(f"tokenizer_source: {donor} has no {TOKENIZER_JSON}: its tokenizer files are copied, embeddings are not remapped")
        return None
    base_tok = _load(checkpoints[base].path)
    base_tok = _stripped(base_tok, _vocab_size(checkpoints[base], base_tok), checkpoints[base].path)
    loaded = []
    for c, ckpt in enumerate(checkpoints):
        tok = base_tok if c == base else _load(ckpt.path)
        if tok is None:
            notes.append(f"tokenizer: {ckpt.path} has no {TOKENIZER_JSON}: taken to share {checkpoints[base].path}'s vocabulary")
            tok = base_tok
        loaded.append((tok, _vocab_size(ckpt, tok)))
    if spec.source == "union":
        out = _union(base_tok, [loaded[base]] + [x for c, x in enumerate(loaded) if c != base], notes)
    elif spec.source == "base":
        out = tokenizers.Tokenizer.from_str(base_tok.to_str())
    else:
        out = _load(donor)
    for token in spec.tokens:
        if out.token_to_id(token) is None:
            out.add_tokens([token])
    vocab = out.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.__getitem__)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise CheckpointError(f"{donor / TOKENIZER_JSON}: token ids are not 0..{len(tokens) - 1} without gaps")
    pad = spec.pad_to_multiple_of or 1
    return Vocabulary(
        out.to_str(), tuple(tokens), math.ceil(len(tokens) / pad) * pad,
        {c: {t: i for t, i in tok.get_vocab(with_added_tokens=True).items() if i < size} for c, (tok, size) in enumerate(loaded)},
        {c: tok.get_vocab(with_added_tokens=True) for c, (tok, _) in enumerate(loaded)},
        donor,
    )


def added_tokens_decoder(tokenizer_json: str) -> dict[str, dict]:
    """``tokenizer_config.json``'s ``added_tokens_decoder`` for a tokenizer.json."""
    return {str(e["id"]): {k: e[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
            for e in json.loads(tokenizer_json)["added_tokens"]}
