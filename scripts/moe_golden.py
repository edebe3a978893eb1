"""Regenerate tests/data/golden_moe: mergekit 0.1.5's outputs on tiny Mixtral and Qwen3-MoE
checkpoints in the published per-expert layout.

    python3 scripts/moe_golden.py /tmp/venv-mergekit/bin/mergekit-yaml

(the venv from scripts/mergekit_venv.sh). mergekit 0.1.5 runs on transformers 5, converts the
per-expert tensors to transformers' fused layout while reading (``mlp.experts.gate_up_proj``,
``mlp.experts.down_proj``) and writes that layout; only its model.safetensors is kept.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from checkpoint_builder import write_family  # noqa: E402
from moe_builder import MoEArch  # noqa: E402

OUT = ROOT / "tests" / "data" / "golden_moe"
ARCH = {family: MoEArch(family, hidden=16, expert_intermediate=12, layers=2, vocab=32, experts=3) for family in ("mixtral", "qwen3_moe")}

# case: (family, config without its model paths); the models are ./models/FAMILY/{base,ft1,ft2}
CASES = {
    "mixtral_linear": ("mixtral", """merge_method: linear
models:
- model: ./models/mixtral/ft1
  parameters: {weight: 0.6}
- model: ./models/mixtral/ft2
  parameters: {weight: 0.3}
- model: ./models/mixtral/base
  parameters: {weight: 0.4}
dtype: float32
"""),
    "mixtral_task_arithmetic_filters": ("mixtral", """merge_method: task_arithmetic
base_model: ./models/mixtral/base
models:
- model: ./models/mixtral/ft1
  parameters:
    weight:
    - {filter: self_attn, value: 0.2}
    - {filter: w2, value: 0.1}
    - {filter: mlp, value: 0.9}
    - {value: 0.5}
- model: ./models/mixtral/ft2
  parameters: {weight: 0.3}
dtype: float32
"""),
    "mixtral_ties": ("mixtral", """merge_method: ties
base_model: ./models/mixtral/base
models:
- model: ./models/mixtral/ft1
  parameters: {weight: 0.6, density: 0.5}
- model: ./models/mixtral/ft2
  parameters: {weight: 0.3, density: 0.7}
dtype: float32
"""),
    "qwen3_moe_linear": ("qwen3_moe", """merge_method: linear
models:
- model: ./models/qwen3_moe/ft1
  parameters:
    weight:
    - {filter: up_proj, value: 0.9}
    - {value: 0.6}
- model: ./models/qwen3_moe/ft2
  parameters: {weight: 0.3}
dtype: float32
"""),
}


def main(mergekit_yaml: str) -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    for family, arch in ARCH.items():
        write_family(OUT / "models" / family, arch, n=2, seed=7)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for case, (_, config) in CASES.items():
        folder = OUT / "cases" / case
        folder.mkdir(parents=True)
        (folder / "config.yml").write_text(config)
        tmp = OUT / "tmp-out"
        subprocess.run([mergekit_yaml, str(folder / "config.yml"), str(tmp), "--random-seed", "42",
                        "--no-copy-tokenizer", "--no-write-model-card"], cwd=OUT, env=env, check=True)
        (folder / "golden").mkdir()
        shutil.move(tmp / "model.safetensors", folder / "golden" / "model.safetensors")
        shutil.rmtree(tmp)
    print(f"written: {OUT} (torch {torch.__version__})")


if __name__ == "__main__":
    main(sys.argv[1])
