"""tokenizer_source / tokenizer: the output vocabulary and the embedding and head rows re-indexed to it."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch

import streammerge
from checkpoint_builder import Arch, base_tensors, fine_tunes, write_checkpoint, write_tokenizer
from conftest import load_output
from streammerge.errors import PlanError
from streammerge.schedule import describe

ARCH = Arch(layers=2)
LETTERS = list(string.ascii_letters)
REGULAR = LETTERS + [LETTERS[i] + LETTERS[i + 1] for i in range(40)]  # 92 tokens, pairs merge their letters
NEW = [LETTERS[i] + LETTERS[i + 2] for i in range(4)]  # ac, bd, ce, df: only ft2 has them
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")

# (regular tokens, added tokens (content, special), config vocab_size = embedding rows)
TOKENIZERS = {
    "base": (REGULAR, [("<s>", True), ("<pad>", True), ("<extra>", False)], 94),  # <extra> (id 94) has no row
    "ft1": (REGULAR, [("<s>", True), ("<pad>", True), ("<extra>", False), ("<tool>", True)], 96),
    "ft2": (REGULAR[:88] + NEW, [("<s>", True), ("<tool>", True)], 94),
}
# the union: the base (stripped), ft2's regular tokens it lacks, then the added tokens it lacks
UNION = REGULAR + ["<s>", "<pad>"] + NEW + ["<extra>", "<tool>"]


def _vocab(name: str) -> dict[str, int]:
    regular, added, rows = TOKENIZERS[name]
    return {t: i for i, t in enumerate(regular + [a for a, _ in added]) if i < rows}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    root = tmp_path_factory.mktemp("tok")
    base = base_tensors(ARCH)
    out = {}
    for (name, (regular, added, rows)), tensors in zip(TOKENIZERS.items(), [base, *fine_tunes(base, 2)]):
        g = torch.Generator().manual_seed(rows + len(name))
        tensors = {k: (0.02 * torch.randn(rows, ARCH.hidden, generator=g, dtype=torch.float64) if k in VOCAB_TENSORS else v)
                   for k, v in tensors.items()}
        path = write_checkpoint(root / name, tensors, ARCH.config(torch.float32) | {"vocab_size": rows})
        write_tokenizer(path, regular, added)
        out[name] = (path, {k: v.float() for k, v in tensors.items()})
    return out


def _remapped(models: dict, tensor: str, tokens: list[str], rows: int, overrides: dict | None = None) -> dict[str, torch.Tensor]:
    """Each model's ``tensor`` re-indexed to ``tokens`` by mergekit's rules, from the whole tensors."""
    overrides = overrides or {}
    names = list(models)
    out = {n: torch.zeros(rows, ARCH.hidden) for n in names}
    for r, tok in enumerate(tokens):
        have = [n for n in names if tok in _vocab(n)]
        row = lambda n, t=tok: models[n][1][tensor][_vocab(n)[t]]  # noqa: E731
        source, force = overrides.get(tok, (None, False))
        if source is not None:
            fill = source()
        elif len(have) == 1 or "base" in have:
            fill = row(have[0])
        elif have:
            fill = torch.zeros(ARCH.hidden)
            for n in have:
                fill += row(n)
            fill /= len(have)
        else:
            fill = torch.zeros(ARCH.hidden)
        for n in names:
            out[n][r] = row(n) if tok in _vocab(n) and not force else fill
    for n in names:
        out[n][len(tokens):] = out[n][: len(tokens)].double().mean(0).float()
    return out


def _plan(models: dict, weights: list[float], **extra) -> dict:
    """linear (the base, for the fill rules, is one more model)."""
    return {"merge_method": "linear", "compute_dtype": "float64", "base_model": str(models["base"][0]),
            "models": [{"model": str(p), "parameters": {"weight": w}} for (p, _), w in zip(models.values(), weights)]} | extra


@pytest.mark.parametrize("chunk_size", [3 * ARCH.hidden, 10**6])
def test_union_remaps_every_row_as_mergekit(models, tmp_path: Path, chunk_size: int) -> None:
    tokenizer = {"tokenizer": {"source": "union", "pad_to_multiple_of": 16}}
    for i, name in enumerate(models):  # one-hot weights: the output is that model's re-indexed tensor, bit for bit
        out = tmp_path / name
        streammerge.merge(_plan(models, [float(i == k) for k in range(3)], **tokenizer), out, quiet=True, chunk_size=chunk_size)
        got = load_output(out)
        for tensor in VOCAB_TENSORS:
            want = _remapped(models, tensor, UNION, 112)[name]
            assert got[tensor].shape == (112, ARCH.hidden)
            assert torch.equal(got[tensor][:100], want[:100]), (name, tensor)
            assert torch.allclose(got[tensor][100:], want[100:], atol=1e-7, rtol=0)  # padding: the mean row
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 112
    sched = streammerge.schedule(_plan(models, [1, 1, 1], **tokenizer))
    try:
        assert "vocabulary    100 tokens (union), 112 embedding rows" in describe(sched)
    finally:
        sched.close()


def test_union_output_tokenizer_loads_in_transformers(models, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    streammerge.merge(_plan(models, [1, 1, 1], tokenizer_source="union"), tmp_path / "out", quiet=True)
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert len(tok) == len(UNION) and tok.get_vocab() == {t: i for i, t in enumerate(UNION)}
    assert tok.encode("ab <tool> ac", add_special_tokens=False) == [UNION.index("ab"), UNION.index("<tool>"), UNION.index("ac")]
    assert tok.added_tokens_decoder[UNION.index("<tool>")].special and not tok.added_tokens_decoder[UNION.index("ac")].special
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == len(UNION)
    merged = load_output(tmp_path / "out")["lm_head.weight"]
    want = _remapped(models, "lm_head.weight", UNION, len(UNION))
    assert (merged - sum(want.values()) / 3).abs().max() < 1e-7


def test_token_overrides_and_added_tokens(models, tmp_path: Path) -> None:
    ft1, ft2 = (str(models[n][0]) for n in ("ft1", "ft2"))
    tokens = {"<s>": {"source": ft1, "force": True},
              "<pad>": {"source": {"kind": "model_token", "model": ft2, "token": "cd"}, "force": True},
              "ac": {"source": {"kind": "zero"}},
              "<new>": {"source": {"kind": "model_token", "model": ft1, "token_id": 7}}}
    streammerge.merge(_plan(models, [0, 0, 1], tokenizer={"source": "base", "tokens": tokens}), tmp_path / "out", quiet=True)
    streammerge.merge(_plan(models, [1, 0, 0], tokenizer={"source": "base", "tokens": tokens}), tmp_path / "base", quiet=True)
    vocab = REGULAR + ["<s>", "<pad>", "ac", "<new>"]  # the stripped base, then the named tokens it lacks
    row = lambda n, i: models[n][1]["model.embed_tokens.weight"][i]  # noqa: E731
    overrides = {"<s>": (lambda: row("ft1", 92), True), "<pad>": (lambda: row("ft2", _vocab("ft2")["cd"]), True),
                 "ac": (lambda: torch.zeros(ARCH.hidden), False), "<new>": (lambda: row("ft1", 7), False)}
    want = _remapped(models, "model.embed_tokens.weight", vocab, len(vocab), overrides)
    assert torch.equal(load_output(tmp_path / "out")["model.embed_tokens.weight"], want["ft2"])
    assert torch.equal(load_output(tmp_path / "base")["model.embed_tokens.weight"], want["base"])


def test_tokenizer_source_model_keeps_that_vocabulary(models, tmp_path: Path) -> None:
    ft1 = models["ft1"][0]
    streammerge.merge(_plan(models, [1, 0, 0], tokenizer_source=str(ft1)), tmp_path / "out", quiet=True)
    vocab = REGULAR + ["<s>", "<pad>", "<extra>", "<tool>"]
    got = load_output(tmp_path / "out")["lm_head.weight"]
    assert torch.equal(got, _remapped(models, "lm_head.weight", vocab, len(vocab))["base"])
    assert json.loads((tmp_path / "out" / "tokenizer.json").read_text())["model"]["vocab"] == {t: i for i, t in enumerate(REGULAR)}


def test_token_source_outside_the_merge_is_refused(models, tmp_path: Path) -> None:
    plan = _plan({k: models[k] for k in ("base", "ft1")}, [1, 1],
                 tokenizer={"tokens": {"ac": {"source": str(models["ft2"][0])}}})
    with pytest.raises(PlanError, match=r"tokenizer.tokens.ac.source: .*ft2 is not an input"):
        streammerge.merge(plan, tmp_path / "out", quiet=True)


def test_union_needs_tokenizer_json(models, tmp_path: Path) -> None:
    bare = write_checkpoint(tmp_path / "bare", {k: v for k, v in models["base"][1].items()}, ARCH.config(torch.float32))
    with pytest.raises(streammerge.StreamMergeError, match="bare: no tokenizer.json"):
        streammerge.merge({"merge_method": "linear", "models": [{"model": str(bare)}, {"model": str(models["ft1"][0])}],
                           "tokenizer_source": "union"}, tmp_path / "out", quiet=True)
