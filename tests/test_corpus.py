"""Published mergekit configs (tests/data/corpus) run unchanged on tiny stand-ins of the models
they name and give mergekit 0.1.5's results (goldens: scripts/corpus_goldens.py, GOLDENS.md).

``expect.json`` pins each config's class: ``exact`` (every element within one rounding: 1e-6 in
float32, one ulp in bf16/fp16), ``tie_order`` (at most ``tie_order_diffs`` elements differ, by the
order of equal values at a selection threshold; for sce, replaying mergekit's steps with either
order must give the golden and our output), ``statistical`` (a random method: kept fraction,
task-vector norm and cosine with mergekit's draw, against ``seed_cos``, the cosine two of
mergekit's seeds give each other) or ``refused`` (mergekit stops; streammerge must stop too, with
one line that contains ``reason``). ``golden_dtype``: mergekit wrote this dtype where the plan says
otherwise (arcee_fusion, a documented difference); its values are compared rounded to the plan's
dtype. Where mergekit failed after writing every tensor (``mergekit_error.txt``), the tensors are
compared and the written config.json must pass transformers' validation, as it must everywhere.
A summary of the classes is printed at the end of the run. Configs pinned ``slow`` (karcher with
a max_iter in the thousands, which mergekit also runs to the end) run with STREAMMERGE_SLOW_TESTS=1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import corpus
import streammerge
from comparison import differing, differing_masks, sce_replay, statistics
from conftest import load_output
from family_builder import build_corpus
from moe_builder import arch_of, fused_state_dict
from streammerge.api import merge_stages
from streammerge.errors import StreamMergeError
from streammerge.frontdoors.mergekit_cli import multi_stages
from streammerge.plan.load import read_documents

CONFIGS = corpus.configs()
EXPECT = corpus.load_expect()
RESULTS: dict[str, str] = {}  # config → its class once it passed; conftest prints the counts


@pytest.fixture(scope="session")
def corpus_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    texts = {s: p.read_text(encoding="utf-8") for s, p in CONFIGS.items()}
    return build_corpus(tmp_path_factory.mktemp("corpus"), texts)


def _layers(config: dict) -> tuple[int, int]:
    text = config.get("text_config", config)
    return text["num_hidden_layers"], text["vocab_size"]


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and?"}]


def _template(directory: Path) -> str | None:
    template = json.loads((directory / "tokenizer_config.json").read_text()).get("chat_template")
    if template is None and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text()
    return template


def _render(template: str) -> list[str]:
    """The template applied as transformers applies chat templates (jinja2, trimmed blocks)."""
    import jinja2.sandbox

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=["jinja2.ext.loopcontrols"])
    compiled = env.from_string(template)
    return [compiled.render(messages=CONVERSATION[:n], add_generation_prompt=prompt, bos_token="<s>",
                            eos_token="</s>", raise_exception=raise_exception)
            for n in (2, 4) for prompt in (False, True)]


def _check_tokenizer(out: Path, golden: Path) -> None:
    """The written vocabulary is mergekit's, and the chat template renders what mergekit's does."""
    from tokenizers import Tokenizer

    if not (golden / "tokenizer.json").is_file():
        return
    vocab = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab(with_added_tokens=True)
    assert vocab == Tokenizer.from_file(str(golden / "tokenizer.json")).get_vocab(with_added_tokens=True)
    if (template := _template(golden)) is not None:
        ours = _template(out)
        assert ours is not None and _render(ours) == _render(template)


def _check_sce_ties(config: Path, got: dict[str, torch.Tensor], gold: dict[str, torch.Tensor],
                    tmp_path: Path) -> None:
    """Each tensor sce gives differently is mergekit's steps replayed with torch.topk's order of
    equal variances at the cut (the golden) and with the lowest flat index first (ours), bit for
    bit. Inputs as mergekit reads them: each reference (adapter folded in) in the config's dtype."""
    (doc,) = corpus.documents(config)

    def read(ref: str, out: Path) -> dict[str, torch.Tensor]:
        streammerge.merge({"merge_method": "passthrough", "models": [{"model": ref}], "dtype": doc["dtype"]},
                          out, quiet=True)
        return load_output(out)

    refs = [doc["base_model"], *(m["model"] for m in doc["models"])]
    base, *models = [read(ref, tmp_path / f"input{i}") for i, ref in enumerate(refs)]
    topk = doc["parameters"]["select_topk"]
    for name, mask in differing_masks(got, gold).items():
        if mask.any():
            deltas = [m[name] - base[name] for m in models]
            assert torch.equal(sce_replay(base[name], deltas, topk, lowest_first=False), gold[name]), name
            assert torch.equal(sce_replay(base[name], deltas, topk, lowest_first=True), got[name]), name


def _merge(config: Path, out: Path) -> None:
    """As the goldens were made: a file of several documents as `streammerge-multi CONFIG --out-path
    OUT -I ./intermediates` (mergekit-multi's command; configs name stages as ./intermediates/X)."""
    if not corpus.is_multi(config):
        streammerge.merge(config, out, quiet=True)
        return
    stages = multi_stages(config, read_documents(config), out, Path("intermediates"), lazy=False)
    merge_stages(config, stages, quiet=True)


SLOW = pytest.mark.skipif(not os.environ.get("STREAMMERGE_SLOW_TESTS"),
                          reason="slow; STREAMMERGE_SLOW_TESTS=1 runs it")


@pytest.mark.parametrize("stem", [pytest.param(s, marks=SLOW) if "slow" in EXPECT.get(s, {}) else s
                                  for s in sorted(CONFIGS)])
def test_config_as_mergekit(stem: str, corpus_dirs: dict[str, Path], tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    assert stem in EXPECT, f"{stem} has no goldens: run scripts/corpus_goldens.py {stem}"
    expect, config, golden = EXPECT[stem], CONFIGS[stem], corpus.CORPUS / "golden" / stem
    monkeypatch.chdir(corpus_dirs[stem])
    out = tmp_path / "out"
    if expect["class"] == "refused":
        assert expect["reason"], f"{stem}: pin in expect.json what {golden / 'refused.txt'} says"
        with pytest.raises(StreamMergeError) as error:
            _merge(config, out)
        message = str(error.value)
        assert "\n" not in message and expect["reason"].lower() in message.lower(), message
        assert not (out / "config.json").exists()
        RESULTS[stem] = "refused"
        return
    _merge(config, out)
    got, gold = load_output(out), load_output(golden)
    # mergekit 0.1.5 writes MoE experts in transformers 5's fused layout; we keep the published one
    fuse = (lambda t: t) if got.keys() == gold.keys() else (lambda t: fused_state_dict(arch_of(out), t))
    got = fuse(got)
    if "golden_dtype" in expect:  # arcee_fusion: mergekit writes float32 whatever the plan says (#604)
        assert {str(g.dtype) for g in gold.values()} == {f"torch.{expect['golden_dtype']}"}
        gold = {k: g.to(got[k].dtype) for k, g in gold.items()}
    assert sorted(got) == sorted(gold)
    if expect["class"] == "statistical":
        statistics(got, gold, fuse(load_output(Path(corpus.base_model(config)))), expect["seed_cos"])
    else:
        assert differing(got, gold) <= expect.get("tie_order_diffs", 0) + expect.get("sum_order_diffs", 0)
        if expect["class"] == "tie_order" and corpus.documents(config)[0]["merge_method"] == "sce":
            _check_sce_ties(config, got, gold, tmp_path)
    written = json.loads((out / "config.json").read_text())
    if (golden / "config.json").is_file():
        assert _layers(written) == _layers(json.loads((golden / "config.json").read_text()))
    _check_tokenizer(out, golden)
    RESULTS[stem] = expect["class"]
    # last, so that a plain install (no transformers) still checks everything above
    transformers = pytest.importorskip("transformers")
    transformers.AutoConfig.from_pretrained(out)  # transformers' own validation (layer_types, ...)


def summary() -> str:
    counts = {c: sum(v == c for v in RESULTS.values()) for c in corpus.CLASSES}
    classes = ", ".join(f"{c} {n}" for c, n in counts.items())
    return f"corpus: {len(RESULTS)} of {len(CONFIGS)} configs as mergekit 0.1.5: {classes}"

