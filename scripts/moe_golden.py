"""Regenerate tests/data/golden_moe: mergekit 0.1.5's outputs on tiny Mixtral and Qwen3-MoE
checkpoints in the published per-expert layout.

    python3 scripts/moe_golden.py /tmp/venv-mergekit/bin/mergekit-yaml

(the venv from scripts/mergekit_venv.sh). mergekit 0.1.5 runs on transformers 5, converts the
per-expert tensors to transformers' fused layout while reading (``mlp.experts.gate_up_proj``,
``mlp.experts.down_proj``) and writes that layout; only its model.safetensors is kept.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from checkpoint_builder import write_family  # noqa: E402
from moe_builder import MoEArch  # noqa: E402

OUT = ROOT / "tests" / "data" / "golden_moe"
ARCH = {family: MoEArch(family, hidden=16, expert_intermediate=12, layers=2, vocab=32, experts=3)
        for family in ("mixtral", "qwen3_moe")}

_BASE = "base_model: ./models/mixtral/base\n"
_FT = "- model: ./models/mixtral/ft{}\n"
_WEIGHTED = ("models:\n" + _FT.format(1) + "  parameters: {{weight: 0.6{0}}}\n"
             + _FT.format(2) + "  parameters: {{weight: 0.3{0}}}\n")
_BASE_AND_FT1 = "models:\n- model: ./models/mixtral/base\n" + _FT.format(1)
_PLAIN = "models:\n" + _FT.format(1) + _FT.format(2)
# More methods on the Mixtral: (config, expert elements that differ by more than 1e-6). mergekit
# takes per-tensor statistics over a layer's fused experts, streammerge over each expert's tensor;
# element-wise methods agree (tests/test_moe.py).
METHODS = {
    "slerp": (_BASE + "parameters: {t: 0.4}\n" + _BASE_AND_FT1, 1962),
    "breadcrumbs": (_BASE + _WEIGHTED.format(", density: 0.8, gamma: 0.05"), 214),
    "sce": (_BASE + "parameters: {select_topk: 0.5}\n" + _PLAIN, 570),
    "karcher": (_PLAIN, 2806),
    "nuslerp": (_BASE + _WEIGHTED.format(""), 3088),
    "multislerp": (_WEIGHTED.format(""), 2743),
    "model_stock": (_BASE + _PLAIN, 3176),
    "ram": (_BASE + _PLAIN, 0),
    "nearswap": (_BASE + "parameters: {t: 0.0005}\n" + _BASE_AND_FT1, 0),
}

# case: (config, expert elements that differ); the models are ./models/FAMILY/{base,ft1,ft2}
CASES = {
    **{f"mixtral_{m}": (f"merge_method: {m}\ndtype: float32\n{c}", n)
       for m, (c, n) in METHODS.items()},
    "mixtral_linear": ("""merge_method: linear
models:
- model: ./models/mixtral/ft1
  parameters: {weight: 0.6}
- model: ./models/mixtral/ft2
  parameters: {weight: 0.3}
- model: ./models/mixtral/base
  parameters: {weight: 0.4}
dtype: float32
""", 0),
    "mixtral_task_arithmetic_filters": ("""merge_method: task_arithmetic
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
""", 0),
    "mixtral_ties": ("""merge_method: ties
base_model: ./models/mixtral/base
models:
- model: ./models/mixtral/ft1
  parameters: {weight: 0.6, density: 0.5}
- model: ./models/mixtral/ft2
  parameters: {weight: 0.3, density: 0.7}
dtype: float32
""", 140),
    "qwen3_moe_linear": ("""merge_method: linear
models:
- model: ./models/qwen3_moe/ft1
  parameters:
    weight:
    - {filter: up_proj, value: 0.9}
    - {value: 0.6}
- model: ./models/qwen3_moe/ft2
  parameters: {weight: 0.3}
dtype: float32
""", 0),
}


def main(mergekit_yaml: str) -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    for family, arch in ARCH.items():
        write_family(OUT / "models" / family, arch, n=2, seed=7)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for case, (config, expert_diffs) in CASES.items():
        folder = OUT / "cases" / case
        folder.mkdir(parents=True)
        (folder / "config.yml").write_text(config)
        (folder / "expect.json").write_text(json.dumps({"expert_diffs": expert_diffs}) + "\n")
        tmp = OUT / "tmp-out"
        subprocess.run([mergekit_yaml, str(folder / "config.yml"), str(tmp), "--random-seed", "42",
                        "--no-copy-tokenizer", "--no-write-model-card"], cwd=OUT, env=env, check=True)
        (folder / "golden").mkdir()
        shutil.move(tmp / "model.safetensors", folder / "golden" / "model.safetensors")
        shutil.rmtree(tmp)
    python = Path(mergekit_yaml).parent / "python"
    versions = subprocess.run([str(python), "-c", _VERSIONS], capture_output=True, text=True, check=True)
    (OUT / "README.md").write_text(_readme(versions.stdout.strip()))
    print(f"written: {OUT}")


def _readme(versions: str) -> str:
    return ("mergekit 0.1.5 outputs on tiny Mixtral and Qwen3-MoE checkpoints (per-expert layout), made by\n"
            f"`python3 scripts/moe_golden.py MERGEKIT_YAML` with {versions}:\n"
            "`mergekit-yaml cases/CASE/config.yml OUT --random-seed 42 --no-copy-tokenizer "
            "--no-write-model-card`\n"
            "run from this folder with OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1. "
            "`cases/CASE/expect.json`: how many\n"
            "expert elements streammerge's output differs on "
            "(see README, Where results differ from mergekit).\n")



_VERSIONS = ("import importlib.metadata as m; print(', '.join(f'{p} {m.version(p)}' for p in "
             "('mergekit', 'torch', 'transformers', 'safetensors')))")


if __name__ == "__main__":
    main(sys.argv[1])
