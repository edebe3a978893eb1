#!/usr/bin/env python3
"""Regenerate mergekit 0.1.5's goldens for the config corpus (tests/data/corpus, see GOLDENS.md).

    python3 scripts/corpus_goldens.py [--mergekit-bin DIR] [--work DIR] [STEM ...]

Builds the tiny stand-ins each config names (tests/family_builder.py), runs mergekit-yaml (or
mergekit-multi for a file of several documents) on every config from its own working
directory with ``--random-seed 42 --no-write-model-card`` and, per config, writes
``tests/data/corpus/golden/<stem>/``: the output's safetensors, index and config.json (plus the
tokenizer files where the config builds a tokenizer), or ``refused.txt`` with mergekit's error
(``mergekit_error.txt`` beside the tensors where it failed after writing all of them).
Random methods run again with seed 43; the cosine between the two draws' task vectors is the
``seed_cos`` their statistical comparison is measured against. ``expect.json`` is updated:
refused and statistical entries from this run, pinned tie-order counts of deterministic configs
kept as they are (a new one starts as ``exact``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import corpus  # noqa: E402
from comparison import task_vector  # noqa: E402
from conftest import load_output  # noqa: E402
from family_builder import build_corpus  # noqa: E402

ERROR_LINE = re.compile(r"^[\w.]*(Error|Exception|Exit)\b")


def run_mergekit(bin_dir: Path, config: Path, cwd: Path, out: Path, seed: int) -> subprocess.CompletedProcess:
    # model cards reproduce LoRA merges with --lora-merge-cache (without it mergekit stops)
    common = ["--random-seed", str(seed), "--no-write-model-card", "--lora-merge-cache", "./lora_cache"]
    if corpus.is_multi(config):
        command = [str(bin_dir / "mergekit-multi"), str(config), "--out-path", str(out),
                   "-I", "./intermediates", *common]
    else:
        command = [str(bin_dir / "mergekit-yaml"), str(config), str(out), *common]
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for stale in (cwd / "intermediates", cwd / "lora_cache", out):
        shutil.rmtree(stale, ignore_errors=True)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)


def error_line(stderr: str) -> str:
    """mergekit's last exception, its detail lines (pydantic's) joined onto one line."""
    lines = [line.rstrip() for line in stderr.splitlines() if line.strip()]
    starts = [k for k, line in enumerate(lines) if ERROR_LINE.match(line)]
    tail = lines[starts[-1]:] if starts else lines[-1:]
    return " | ".join(line.strip() for line in tail if "errors.pydantic.dev" not in line)


def wrote_tensors(out: Path) -> bool:
    """Whether mergekit finished writing tensors (it writes config.json after them)."""
    index = out / "model.safetensors.index.json"
    if index.is_file():
        return all((out / s).is_file() for s in json.loads(index.read_text())["weight_map"].values())
    return (out / "model.safetensors").is_file()


def save_golden(out: Path, golden: Path, with_tokenizer: bool) -> None:
    names = [p.name for p in out.glob("*.safetensors")] + ["model.safetensors.index.json", "config.json"]
    names += list(corpus.TOKENIZER_FILES) if with_tokenizer else []
    for name in names:
        if (out / name).is_file():
            shutil.copyfile(out / name, golden / name)


def seed_cosine(out: Path, other: Path, base: Path) -> float:
    reference = load_output(base)
    a, b = task_vector(load_output(out), reference), task_vector(load_output(other), reference)
    return (a @ b / (a.norm() * b.norm())).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit-bin", type=Path, default=Path("/tmp/venv-mergekit/bin"))
    parser.add_argument("--work", type=Path, help="stand-ins and outputs (default: a temporary directory)")
    parser.add_argument("stems", nargs="*", help="only these configs (default: all)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="corpus-goldens-"))
    paths = {s: p for s, p in corpus.configs().items() if not args.stems or s in args.stems}
    dirs = build_corpus(work, {s: p.read_text(encoding="utf-8") for s, p in paths.items()})
    expect = corpus.load_expect()
    for stem, config in paths.items():
        cwd, out = dirs[stem], work / "out" / stem
        golden = corpus.CORPUS / "golden" / stem
        shutil.rmtree(golden, ignore_errors=True)
        golden.mkdir(parents=True)
        result = run_mergekit(args.mergekit_bin, config, cwd, out, 42)
        previous = expect.get(stem, {})
        if result.returncode != 0 and wrote_tensors(out):
            # mergekit 0.1.5 on transformers 5 fails saving some configs after writing every tensor
            # (a layer count changed without its layer_types): the tensors are still its result
            (golden / "mergekit_error.txt").write_text(error_line(result.stderr) + "\n")
        if result.returncode != 0 and not wrote_tensors(out):
            (golden / "refused.txt").write_text(error_line(result.stderr) + "\n")
            expect[stem] = {"class": "refused", "reason": previous.get("reason", "")}
        else:
            save_golden(out, golden, corpus.builds_tokenizer(config))
            if corpus.is_random(config):
                other = work / "out" / f"{stem}-seed43"
                run_mergekit(args.mergekit_bin, config, cwd, other, 43)
                cos = seed_cosine(out, other, cwd / corpus.base_model(config))
                expect[stem] = {"class": "statistical", "seed_cos": round(cos, 3)}
            elif previous.get("class") in ("exact", "tie_order"):
                expect[stem] = previous
            else:
                expect[stem] = {"class": "exact", "tie_order_diffs": 0}
        print(f"{stem}: {expect[stem]['class']}", flush=True)
    corpus.save_expect(expect)
    counts = {c: sum(e["class"] == c for e in expect.values()) for c in corpus.CLASSES}
    size = sum(p.stat().st_size for p in (corpus.CORPUS / "golden").rglob("*") if p.is_file())
    print(f"{len(expect)} configs: {counts}; goldens {size / 1e6:.2f} MB; work dir {work}")


if __name__ == "__main__":
    main()
