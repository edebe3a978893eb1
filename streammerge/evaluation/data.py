"""Evaluation documents from a file or a Hugging Face dataset, as a list of strings.

Documents are returned exactly as stored, empty ones included: the WikiText protocol joins every
row of the split (many of them empty) with "\\n\\n", and dropping them changes the tokens.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from streammerge.errors import DataError

EXTENSIONS = (".txt", ".jsonl", ".json", ".parquet")
# name[:config]:split; a split may carry a slice such as train[:10%] (the one place a ':' may sit).
_DATASET = re.compile(r"^(?P<name>[^:\[\]]+?)(?::(?P<config>[^:\[\]]+))?"
                      r":(?P<split>[^:\[\]]+(?:\[[^\]]*\])?)$")
_INSTALL = "pip install 'streammerge[data]'"


def read_documents(source: str, text_field: str = "text") -> list[str]:
    """The documents of ``source``: a .txt file (one document), .jsonl/.json records (their
    ``text_field``), a .parquet column, or a Hugging Face dataset given as ``name[:config]:split``."""
    path = Path(source)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".txt":
            docs = [_read_text(path)]
        elif suffix == ".jsonl":
            docs = _read_jsonl(path, text_field)
        elif suffix == ".json":
            docs = _read_json(path, text_field)
        elif suffix == ".parquet":
            docs = _read_parquet(path, text_field)
        else:
            raise DataError(f"{source}: unknown data format {repr(suffix) if suffix else '(no extension)'}; "
                            f"give a {', '.join(EXTENSIONS)} file or a dataset as name[:config]:split")
    elif not path.exists() and (m := _DATASET.match(source)):
        docs = _read_dataset(source, m["name"], m["config"], m["split"], text_field)
    elif path.is_dir():
        raise DataError(f"{source}: is a directory; give a {', '.join(EXTENSIONS)} file, or a "
                        f"dataset directory with its split as {source}:SPLIT")
    else:
        raise DataError(f"{source}: no such file; give a {', '.join(EXTENSIONS)} file "
                        "or a Hugging Face dataset as name[:config]:split")
    if not any(docs):
        what = "no documents" if not docs else f"{len(docs)} empty document{'s' * (len(docs) > 1)}"
        raise DataError(f"{source}: empty data ({what}); give text to evaluate on")
    return docs


def _read_text(path: Path) -> str:
    try:  # bytes decoded as they are: text mode would turn "\r\n" into "\n" and change the tokens
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); convert it to UTF-8") from None


def _field(record: Any, where: str, text_field: str, source: object, strings: bool = False) -> str:
    """``record[text_field]`` as a string (``record`` itself when ``strings`` allows bare strings);
    ``where`` locates the record for the message."""
    if strings and isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise DataError(f"{source}: {where} is a JSON {type(record).__name__}, "
                        f"not an object with a {text_field!r} field")
    if text_field not in record:
        fields = ", ".join(map(repr, record)) or "none"
        raise DataError(f"{source}: {where} has no field {text_field!r} (its fields: {fields}); "
                        "choose the text field with --text-field")
    return _string(record[text_field], where, text_field, source)


def _string(value: Any, where: str, text_field: str, source: object) -> str:
    if not isinstance(value, str):
        raise DataError(f"{source}: {where} field {text_field!r} is {type(value).__name__} "
                        f"{str(value)[:40]!r}, not a string; choose the text field with --text-field")
    return value


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    docs: list[str] = []
    # split on "\n" only: str.splitlines also splits at U+2028, which a JSON string may hold unescaped
    for number, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():  # blank lines (a trailing newline, a separator) hold no record
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON on line {number} (column {e.colno}): {e.msg}; "
                            "a .jsonl file holds one JSON object per line") from None
        docs.append(_field(record, f"record {len(docs)} (line {number})", text_field, path))
    return docs


def _read_json(path: Path, text_field: str) -> list[str]:
    try:
        records = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON on line {e.lineno} (column {e.colno}): {e.msg}; "
                        "a .json file holds one list (JSON lines go in a .jsonl file)") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: holds a JSON {type(records).__name__}; a .json file must hold a "
                        f"list of objects with a {text_field!r} field, or a list of strings")
    return [_field(r, f"record {i}", text_field, path, strings=True) for i, r in enumerate(records)]


def _read_parquet(path: Path, text_field: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow: {_INSTALL}") from None
    try:
        columns = pq.read_schema(path).names
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    _check_column(path, text_field, columns)
    values = pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()
    return [_string(v, f"record {i}", text_field, path) for i, v in enumerate(values)]


def _check_column(source: object, text_field: str, columns: list[str]) -> None:
    if text_field not in columns:
        raise DataError(f"{source}: no column {text_field!r} (its columns: "
                        f"{', '.join(map(repr, columns))}); choose the text field with --text-field")


def _read_dataset(source: str, name: str, config: str | None, split: str, text_field: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{source}: Hugging Face datasets need the datasets package: {_INSTALL}") from None
    try:
        table = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 - the hub, the builders and the splits raise many kinds
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{source}: cannot load dataset {name!r} (config {config}, split {split!r}): "
                        f"{first} (check the name, config and split; offline? set HF_DATASETS_OFFLINE=1 "
                        "and use a cached or local dataset)") from None
    _check_column(source, text_field, table.column_names)
    return [_string(v, f"record {i}", text_field, source) for i, v in enumerate(table[text_field])]
