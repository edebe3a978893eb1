"""Regenerate this folder: a fine-tune with two added tokens, and mergekit 0.1.5's outputs for it.

    python3 tests/data/vocab_truncate/make.py [MERGEKIT_YAML]   (default /tmp/venv-mergekit/bin/mergekit-yaml)

``models/ft2_grown`` is ``../golden/models/fp32/ft2`` with two tokens added (``<pad>``, id 120, and
``<|im_start|>``, id 121): two rows appended to ``model.embed_tokens.weight`` and ``lm_head.weight``,
``vocab_size`` 122. Each ``cases/<case>/config.yml`` is then merged by mergekit into
``cases/<case>/golden``: with ``--unsafe-truncate-embeddings`` unless the config has a tokenizer block.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent / "golden" / "models" / "fp32" / "ft2"
ADDED = ("<pad>", "<|im_start|>")


def grown_model() -> Path:
    out = HERE / "models" / "ft2_grown"
    out.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(SOURCE / "model.safetensors"))
    g = torch.Generator().manual_seed(122)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        extra = 0.02 * torch.randn(len(ADDED), tensors[name].shape[1], generator=g)
        tensors[name] = torch.cat([tensors[name], extra]).contiguous()
    save_file(tensors, str(out / "model.safetensors"), {"format": "pt"})
    config = json.loads((SOURCE / "config.json").read_text())
    config["vocab_size"] += len(ADDED)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer = json.loads((SOURCE / "tokenizer.json").read_text())
    first = len(tokenizer["model"]["vocab"])
    tokenizer["added_tokens"] += [{"id": first + i, "content": t, "single_word": False, "lstrip": False,
                                   "rstrip": False, "normalized": False, "special": True}
                                  for i, t in enumerate(ADDED)]
    (out / "tokenizer.json").write_text(json.dumps(tokenizer))
    shutil.copy(SOURCE / "tokenizer_config.json", out / "tokenizer_config.json")
    return out


def golden(case: Path, mergekit: str) -> None:
    config = (case / "config.yml").read_text()
    truncate = [] if "tokenizer" in config else ["--unsafe-truncate-embeddings"]
    out = case / "golden"
    shutil.rmtree(out, ignore_errors=True)
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run([mergekit, str(case / "config.yml"), str(out), "--random-seed", "42",
                    "--no-copy-tokenizer", "--no-write-model-card", *truncate],
                   cwd=HERE, env=env, check=True)


    for extra in out.iterdir():  # only the tensors are compared
        if extra.is_dir():
            shutil.rmtree(extra)
        elif extra.name != "model.safetensors":
            extra.unlink()


if __name__ == "__main__":
    grown_model()
    for case in sorted((HERE / "cases").iterdir()):
        golden(case, sys.argv[1] if len(sys.argv) > 1 else "/tmp/venv-mergekit/bin/mergekit-yaml")
