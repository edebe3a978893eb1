"""Evaluation data: reading documents from every accepted source, the scoring windows against the
Hugging Face and GPTQ loops written out here, and tokenization with a real tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from checkpoint_builder import write_tokenizer
from streammerge.errors import DataError
from streammerge.evaluation.data import read_documents
from streammerge.evaluation.windows import Protocol, Window, cut_windows, tokenize

REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_parquet(path: Path, columns: dict[str, list]) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


# --- reading documents ---------------------------------------------------------------------------

def test_txt_is_one_document_exactly_as_stored(tmp_path: Path) -> None:
    text = "First paragraph.\r\n\r\n = Heading = \n\nSecond, with ünïcode.\n"
    (tmp_path / "a.txt").write_bytes(text.encode("utf-8"))
    assert read_documents(str(tmp_path / "a.txt")) == [text]


def test_jsonl_default_and_custom_field_keep_empty_documents(tmp_path: Path) -> None:
    records = [{"text": "one", "body": "x"}, {"text": "", "body": "y"}, {"text": " three ", "body": ""}]
    path = tmp_path / "d.jsonl"
    # a blank line between records and at the end holds no record
    path.write_text(json.dumps(records[0]) + "\n\n" + "\n".join(map(json.dumps, records[1:])) + "\n\n")
    assert read_documents(str(path)) == ["one", "", " three "]
    assert read_documents(str(path), text_field="body") == ["x", "y", ""]
    # a line separator (U+2028) and a "\r\n" line end inside and after a record
    (tmp_path / "u.jsonl").write_text('{"text": "a\u2028b"}\r\n{"text": "c"}\r\n', encoding="utf-8")
    assert read_documents(str(tmp_path / "u.jsonl")) == ["a\u2028b", "c"]


def test_json_list_of_objects_or_strings(tmp_path: Path) -> None:
    objects = tmp_path / "o.json"
    objects.write_text(json.dumps([{"text": "a", "content": "b"}, {"text": "c", "content": "d"}]))
    assert read_documents(str(objects)) == ["a", "c"]
    assert read_documents(str(objects), text_field="content") == ["b", "d"]
    strings = tmp_path / "s.json"
    strings.write_text(json.dumps(["p", "", "q"]))
    assert read_documents(str(strings)) == ["p", "", "q"]


def test_parquet_default_and_custom_field(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "d.parquet", {"text": ["a", "", "c"], "story": ["s1", "s2", "s3"],
                                                  "n": [1, 2, 3]})
    assert read_documents(str(path)) == ["a", "", "c"]
    assert read_documents(str(path), text_field="story") == ["s1", "s2", "s3"]


def test_extension_is_case_insensitive(tmp_path: Path) -> None:
    (tmp_path / "A.TXT").write_text("upper")
    assert read_documents(str(tmp_path / "A.TXT")) == ["upper"]


def run_datasets(tmp_path: Path, calls: list[tuple[str, str]]) -> list[dict]:
    """``read_documents(source, field)`` for each call in a fresh interpreter that is offline and has
    its datasets cache in tmp_path (the datasets package reads both settings when imported)."""
    script = (
        "import json, sys\n"
        "from streammerge.errors import DataError\n"
        "from streammerge.evaluation.data import read_documents\n"
        "out = []\n"
        "for source, field in json.loads(sys.argv[1]):\n"
        "    try:\n"
        "        out.append({'docs': read_documents(source, field)})\n"
        "    except DataError as e:\n"
        "        out.append({'error': str(e)})\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script, json.dumps(calls)], capture_output=True,
                          text=True, env=env, timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_local_dataset_directory_and_dataset_errors(tmp_path: Path) -> None:
    data = tmp_path / "my_dataset"
    data.mkdir()
    write_jsonl(data / "train.jsonl", [{"text": "t0", "title": "a"}, {"text": "", "title": "b"}])
    write_jsonl(data / "test.jsonl", [{"text": "x0", "title": "c"}])
    calls = [(f"{data}:train", "text"), (f"{data}:train", "title"), (f"{data}:test", "text"),
             (f"{data}:train[:1]", "text"), (f"{data}:train", "body"), (f"{data}:validation", "text"),
             ("no_such_dataset_zz:some-config:test", "text")]
    train, title, test, sliced, field, split, offline = run_datasets(tmp_path, calls)
    assert train == {"docs": ["t0", ""]}
    assert title == {"docs": ["a", "b"]}
    assert test == {"docs": ["x0"]}
    assert sliced == {"docs": ["t0"]}
    assert field["error"] == (f"{data}:train: no column 'body' (its columns: 'text', 'title'); "
                              "choose the text field with --text-field")
    assert split["error"].startswith(f"{data}:validation: cannot load dataset '{data}' "
                                     "(config None, split 'validation'): Unknown split \"validation\"")
    assert "\n" not in offline["error"]
    assert offline["error"].startswith("no_such_dataset_zz:some-config:test: cannot load dataset "
                                       "'no_such_dataset_zz' (config some-config, split 'test'): ")
    assert offline["error"].endswith("(check the name, config and split; offline? set "
                                     "HF_DATASETS_OFFLINE=1 and use a cached or local dataset)")


@pytest.mark.parametrize("write, message", [
    (lambda p: p.with_suffix(".csv").write_text("a,b"), "unknown data format '.csv'; give a .txt, "
     ".jsonl, .json, .parquet file or a dataset as name[:config]:split"),
    (lambda p: p.write_text("a"), "unknown data format (no extension); give a .txt, "
     ".jsonl, .json, .parquet file or a dataset as name[:config]:split"),
    (lambda p: p.with_suffix(".txt").write_text(""),
     "empty data (1 empty document); give text to evaluate on"),
    (lambda p: p.with_suffix(".jsonl").write_text("\n\n"),
     "empty data (no documents); give text to evaluate on"),
    (lambda p: write_jsonl(p.with_suffix(".jsonl"), [{"text": ""}, {"text": ""}]),
     "empty data (2 empty documents); give text to evaluate on"),
    (lambda p: p.with_suffix(".json").write_text("[]"), "empty data (no documents)"),
    (lambda p: p.with_suffix(".jsonl").write_text('{"text": "a"}\n{"text": "b",}\n'),
     "invalid JSON on line 2 (column 14): Expecting property name enclosed in double quotes; "
     "a .jsonl file holds one JSON object per line"),
    (lambda p: p.with_suffix(".json").write_text('[\n {"text": "a"},\n {"text": b}\n]'),
     "invalid JSON on line 3 (column 11): Expecting value; a .json file holds one list "
     "(JSON lines go in a .jsonl file)"),
    (lambda p: write_jsonl(p.with_suffix(".jsonl"), [{"text": "a"}, {"title": "t", "body": "b"}]),
     "record 1 (line 2) has no field 'text' (its fields: 'title', 'body'); "
     "choose the text field with --text-field"),
    (lambda p: write_jsonl(p.with_suffix(".jsonl"), [["a list"]]),
     "record 0 (line 1) is a JSON list, not an object with a 'text' field"),
    (lambda p: write_jsonl(p.with_suffix(".jsonl"), ["a bare string"]),
     "record 0 (line 1) is a JSON str, not an object with a 'text' field"),
    (lambda p: write_jsonl(p.with_suffix(".jsonl"), [{"text": "a"}, {"text": "b"}, {"text": 3}]),
     "record 2 (line 3) field 'text' is int '3', not a string; choose the text field with --text-field"),
    (lambda p: p.with_suffix(".json").write_text(json.dumps({"text": ["a"]})),
     "holds a JSON dict; a .json file must hold a list of objects with a 'text' field, or a list of strings"),
    (lambda p: p.with_suffix(".json").write_text(json.dumps([{"text": "a"}, {}])),
     "record 1 has no field 'text' (its fields: none); choose the text field with --text-field"),
    (lambda p: write_parquet(p.with_suffix(".parquet"), {"body": ["a"], "id": [1]}),
     "no column 'text' (its columns: 'body', 'id'); choose the text field with --text-field"),
    (lambda p: write_parquet(p.with_suffix(".parquet"), {"text": ["a", None]}),
     "record 1 field 'text' is NoneType 'None', not a string; choose the text field with --text-field"),
    (lambda p: p.with_suffix(".parquet").write_text("not parquet"), "not a readable parquet file ("),
    (lambda p: p.with_suffix(".txt").write_bytes(b"ok\xff"), "not UTF-8 text (byte 2); convert it to UTF-8"),
])
def test_bad_files_name_the_file_and_the_fix(tmp_path: Path, write, message: str) -> None:
    write(tmp_path / "data")
    (path,) = tmp_path.iterdir()
    with pytest.raises(DataError) as e:
        read_documents(str(path))
    assert str(e.value).startswith(f"{path}: {message}")
    assert "\n" not in str(e.value)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        read_documents(str(tmp_path / "nope.txt"))
    assert str(e.value) == (f"{tmp_path / 'nope.txt'}: no such file; give a .txt, .jsonl, .json, .parquet "
                            "file or a Hugging Face dataset as name[:config]:split")
    with pytest.raises(DataError) as e:
        read_documents(str(tmp_path))
    assert str(e.value) == (f"{tmp_path}: is a directory; give a .txt, .jsonl, .json, .parquet file, or a "
                            f"dataset directory with its split as {tmp_path}:SPLIT")


def test_missing_optional_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes the import raise ImportError, as it does where a package is absent
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "datasets", None)
    parquet = tmp_path / "d.parquet"
    parquet.write_bytes(b"PAR1")
    with pytest.raises(DataError) as e:
        read_documents(str(parquet))
    assert str(e.value) == f"{parquet}: reading .parquet needs pyarrow: pip install 'streammerge[data]'"
    with pytest.raises(DataError) as e:
        read_documents("wikitext:wikitext-2-raw-v1:test")
    assert str(e.value) == ("wikitext:wikitext-2-raw-v1:test: Hugging Face datasets need the datasets "
                            "package: pip install 'streammerge[data]'")


# --- the protocol --------------------------------------------------------------------------------

def test_protocol_describes_itself() -> None:
    gptq = Protocol()
    assert gptq.describe() == (
        "documents joined with '\\n\\n', tokenized once with the model's tokenizer (default special "
        "tokens), non-overlapping 2048-token windows, tail dropped, each window scored on positions "
        "1..2047 (GPTQ/SparseGPT protocol)")
    assert gptq.as_dict() == {"name": "non-overlapping", "seqlen": 2048, "stride": None, "samples": None,
                              "join": "\n\n", "special_tokens": "default", "description": gptq.describe()}
    json.dumps(gptq.as_dict())
    sliding = Protocol(seqlen=1024, stride=512, samples=8, join=" ")
    assert sliding.describe() == (
        "documents joined with ' ', tokenized once with the model's tokenizer (default special tokens), "
        "1024-token windows starting every 512 tokens, the last ending at the text's end, the first 8 "
        "kept, each window scoring the tokens no earlier window scored, from its position 1 on "
        "(Hugging Face sliding-window protocol)")
    assert sliding.as_dict()["name"] == "sliding-window"
    assert (sliding.as_dict()["stride"], sliding.as_dict()["samples"]) == (512, 8)


@pytest.mark.parametrize("kwargs, message", [
    ({"seqlen": 1},
     "seqlen=1 is too short: a window scores its positions 1..seqlen-1 (use --seqlen 2 or more)"),
    ({"seqlen": 8, "stride": 0}, "stride=0 is out of range: windows of seqlen=8 tokens need "
     "1 <= stride <= 8 (use --stride S in that range)"),
    ({"seqlen": 8, "stride": 9}, "stride=9 is out of range: windows of seqlen=8 tokens need "
     "1 <= stride <= 8 (use --stride S in that range)"),
    ({"samples": 0}, "samples=0: at least one window must be kept (use --samples 1 or more, "
     "or leave it out for every window)"),
])
def test_bad_protocols(kwargs: dict, message: str) -> None:
    with pytest.raises(DataError) as e:
        Protocol(**kwargs)
    assert str(e.value) == message


def test_text_shorter_than_one_window() -> None:
    for stride in (None, 3):
        with pytest.raises(DataError) as e:
            cut_windows(torch.arange(7), Protocol(seqlen=8, stride=stride))
        assert str(e.value) == ("data has 7 tokens; one window needs seqlen=8 "
                                "(use --seqlen 7 or less, or more text)")
    with pytest.raises(DataError) as e:
        cut_windows(torch.arange(0), Protocol(seqlen=8))
    assert str(e.value) == "data has 0 tokens; one window needs seqlen=8 (give more text)"


# --- the windows against the published loops, written out ---------------------------------------

def scored(windows: list[Window]) -> list[tuple[list[int], list[int]]]:
    """Each window as (its token positions, the positions it scores); the ids are arange(n), so a
    token's value is its position in the text."""
    return [(w.ids.tolist(), w.ids[w.score_from:].tolist()) for w in windows]


def gptq_reference(n: int, seqlen: int) -> list[tuple[list[int], list[int]]]:
    """GPTQ's WikiText loop: nsamples = n // seqlen windows; the loss compares logits[:, :-1] with
    ids[:, 1:], so every position but the first is scored."""
    ids = torch.arange(n)
    out = []
    for i in range(n // seqlen):
        batch = ids[i * seqlen:(i + 1) * seqlen]
        out.append((batch.tolist(), batch[1:].tolist()))
    return out


def hf_reference(n: int, seqlen: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """transformers' perplexity.md loop as published: labels -100 outside the last trg_len tokens;
    the model's loss shifts labels left by one, so label p is scored when p >= 1 and labels[p] is
    not -100. A window that scores nothing (a 1-token tail at stride == seqlen) is left out: its
    mean loss there is over no tokens (NaN)."""
    ids = torch.arange(n)
    out = []
    prev_end_loc = 0
    for begin_loc in range(0, n, stride):
        end_loc = min(begin_loc + seqlen, n)
        trg_len = end_loc - prev_end_loc
        input_ids = ids[begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:-trg_len] = -100
        shift_labels = target_ids[1:]
        kept = shift_labels[shift_labels != -100].tolist()
        if kept:
            out.append((input_ids.tolist(), kept))
        prev_end_loc = end_loc
        if end_loc == n:
            break
    return out


CASES = [(n, seqlen, stride) for n in (8, 9, 10, 16, 17, 23, 40) for seqlen in (2, 4, 8)
         for stride in sorted({1, 2, 3, seqlen // 2 or 1, seqlen - 1 or 1, seqlen}) if stride <= seqlen]


@pytest.mark.parametrize("n, seqlen, stride", CASES)
def test_windows_equal_the_published_loops(n: int, seqlen: int, stride: int) -> None:
    ids = torch.arange(n)
    assert scored(cut_windows(ids, Protocol(seqlen=seqlen))) == gptq_reference(n, seqlen)
    assert scored(cut_windows(ids, Protocol(seqlen=seqlen, stride=stride))) == hf_reference(n, seqlen, stride)
    for samples in (1, 2, 100):
        assert (scored(cut_windows(ids, Protocol(seqlen=seqlen, stride=stride, samples=samples)))
                == hf_reference(n, seqlen, stride)[:samples])
        assert (scored(cut_windows(ids, Protocol(seqlen=seqlen, samples=samples)))
                == gptq_reference(n, seqlen)[:samples])


def test_stride_equal_to_seqlen_is_non_overlapping_plus_the_tail() -> None:
    ids = torch.arange(10)
    # a multiple of seqlen: the same windows as the GPTQ protocol
    assert (scored(cut_windows(ids[:8], Protocol(seqlen=4, stride=4)))
            == scored(cut_windows(ids[:8], Protocol(seqlen=4))))
    # otherwise the tail is a last, shorter window; each window's first token is never scored
    assert scored(cut_windows(ids, Protocol(seqlen=4, stride=4))) == [
        ([0, 1, 2, 3], [1, 2, 3]), ([4, 5, 6, 7], [5, 6, 7]), ([8, 9], [9])]
    assert scored(cut_windows(ids, Protocol(seqlen=4))) == [([0, 1, 2, 3], [1, 2, 3]),
                                                           ([4, 5, 6, 7], [5, 6, 7])]
    # a 1-token tail scores nothing and is not a window
    assert len(cut_windows(ids[:9], Protocol(seqlen=4, stride=4))) == 2


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 64).flatmap(lambda seqlen: st.tuples(
    st.integers(seqlen, 300), st.just(seqlen), st.integers(1, seqlen))))
def test_sliding_windows_properties(case: tuple[int, int, int]) -> None:
    n, seqlen, stride = case
    windows = cut_windows(torch.arange(n), Protocol(seqlen=seqlen, stride=stride))
    assert scored(windows) == hf_reference(n, seqlen, stride)
    positions = [p for w in windows for p in w.ids[w.score_from:].tolist()]
    assert len(positions) == len(set(positions))  # no token is scored twice
    if stride < seqlen:
        assert positions == list(range(1, n))  # every token after the text's first, in order
        # every window after the first gives each scored token at least seqlen - stride tokens of context
        assert all(w.score_from == seqlen - stride for w in windows[1:])
    assert all(1 <= w.score_from < w.ids.numel() <= seqlen and w.ids.dtype == torch.int64 for w in windows)


# --- tokenization --------------------------------------------------------------------------------

TOKENS = ["<unk>", "<s>", "</s>", "a", "b", "c", "ab"]


def tiny_tokenizer(path: Path, bos: bool):
    from tokenizers import Tokenizer, processors
    from transformers import AutoTokenizer

    path.mkdir()
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4}))
    write_tokenizer(path, TOKENS)
    if bos:  # a Llama-style template: "<s>" before every encoded text
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        tok.save(str(path / "tokenizer.json"))
        config = json.loads((path / "tokenizer_config.json").read_text())
        (path / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": "<s>"}))
    return AutoTokenizer.from_pretrained(str(path))


def test_tokenize_joins_first_and_adds_the_bos_once(tmp_path: Path) -> None:
    docs = ["abc a", "", "b ab c"]
    # by hand: the whitespace pre-tokenizer drops the joins; "abc" is "ab"=6 "c"=5; "a"=3, "b"=4
    words = [6, 5, 3, 4, 6, 5]
    ids = tokenize(tiny_tokenizer(tmp_path / "bos", bos=True), docs, "\n\n")
    assert ids.dtype == torch.int64 and ids.tolist() == [1, *words]
    assert tokenize(tiny_tokenizer(tmp_path / "plain", bos=False), docs, "\n\n").tolist() == words
    # longer than model_max_length (4): nothing is truncated, the windows cut the text
    long = tokenize(tiny_tokenizer(tmp_path / "long", bos=True), ["a b c"] * 10, " ")
    assert long.tolist() == [1, *[3, 4, 5] * 10]
    windows = cut_windows(long, Protocol(seqlen=8))
    assert [w.ids.tolist()[:1] for w in windows] == [[1], [4], [3]]  # only the first window starts with <s>
