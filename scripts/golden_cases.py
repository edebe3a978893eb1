"""Half-precision parity cases for tests/data/golden: inputs, configs and mergekit 0.1.5 goldens.

    python3 scripts/golden_cases.py --mergekit /tmp/venv-mergekit/bin/mergekit-yaml [CASE ...]

1. ``models/fp16/{base,ft1,ft2,ft3}`` and ``models/bf16/ft3`` are written as the exact float16 /
   bfloat16 rounding of ``models/fp32/*`` (the way ``models/bf16/{base,ft1,ft2}`` were made), with
   the fp32 model's config.json (``torch_dtype`` changed) and tokenizer files.
2. ``cases/{bf16,fp16}_<method>/config.yml`` are written: for every deterministic method, the fp32
   case's config on the half-precision inputs with ``dtype: bfloat16`` / ``float16``.
3. mergekit-yaml runs each case, from the golden folder (model paths are relative to it), as
   ``OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 mergekit-yaml cases/<case>/config.yml OUT --random-seed 42
   --no-copy-tokenizer --no-write-model-card``; ``model.safetensors`` and ``config.json`` of its
   output are kept in ``cases/<case>/golden/``.

With CASE names only those are (re)generated (any case folder, the fp32 ones too); without, every
half-precision case. Inputs and configs are rewritten each time; they are deterministic.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "data" / "golden"
DTYPES = {"bf16": (torch.bfloat16, "bfloat16"), "fp16": (torch.float16, "float16")}
# rounded here from models/fp32; bf16 base/ft1/ft2 come from the shared golden set
ROUNDED = {"fp16": ("base", "ft1", "ft2", "ft3"), "bf16": ("ft3",)}


def _model(d: str, name: str, **params: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"model": f"./models/{d}/{name}"}
    if params:
        entry["parameters"] = params
    return entry


def _weighted(d: str, weights: dict[str, float], **params: Any) -> list[dict[str, Any]]:
    return [_model(d, name, weight=w, **params) for name, w in weights.items()]


def case_configs(d: str) -> dict[str, dict[str, Any]]:
    """The half-precision cases of dtype ``d``, by case name: the fp32 cases' parameters."""
    fts = {"ft1": 0.8, "ft2": 0.3, "ft3": 0.6}
    plain = [_model(d, n) for n in ("ft1", "ft2", "ft3")]
    base = {"base_model": f"./models/{d}/base"}
    cases: dict[str, dict[str, Any]] = {
        "linear": {"merge_method": "linear", "models": _weighted(d, {"ft1": 0.3, "ft2": 0.7})},
        "ties": {"merge_method": "ties", **base,
                 "models": _weighted(d, {"ft1": 0.6, "ft2": 0.4}, density=0.4),
                 "parameters": {"normalize": True}},
        "task_arithmetic": {"merge_method": "task_arithmetic", **base, "models": _weighted(d, fts),
                            "parameters": {"lambda": 0.8}},
        "ties3": {"merge_method": "ties", **base, "models": _weighted(d, fts, density=0.4),
                  "parameters": {"normalize": True}},
        "breadcrumbs": {"merge_method": "breadcrumbs", **base,
                        "models": _weighted(d, fts, density=0.7, gamma=0.1)},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", **base,
                             "models": _weighted(d, fts, density=0.75, gamma=0.03),
                             "parameters": {"normalize": True}},
        "slerp": {"merge_method": "slerp", "base_model": f"./models/{d}/ft2",
                  "models": [_model(d, "ft2"), _model(d, "ft3")], "parameters": {"t": 0.65}},
        "nuslerp_rows": {"merge_method": "nuslerp", "models": _weighted(d, {"ft1": 0.35, "ft3": 0.65}),
                         "parameters": {"nuslerp_flatten": False}},
        "nuslerp_base": {"merge_method": "nuslerp", **base,
                         "models": _weighted(d, {"ft2": 0.55, "ft3": 0.45})},
        "nuslerp_columns": {"merge_method": "nuslerp", **base,
                            "models": _weighted(d, {"ft1": 0.2, "ft2": 0.7}),
                            "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}},
        "multislerp": {"merge_method": "multislerp",
                       "models": _weighted(d, {"ft1": 0.5, "ft2": 0.2, "ft3": 0.3})},
        "karcher": {"merge_method": "karcher", "models": plain,
                    "parameters": {"max_iter": 25, "tol": 1.0e-07}},
        "model_stock": {"merge_method": "model_stock", **base, "models": plain},
        "model_stock_filterwise": {"merge_method": "model_stock", **base, "models": plain,
                                   "parameters": {"filter_wise": True}},
        "sce": {"merge_method": "sce", **base, "models": plain, "parameters": {"select_topk": 0.6}},
        "ram": {"merge_method": "ram", **base, "models": plain},
        "ramplus_tl": {"merge_method": "ramplus_tl", **base, "models": plain,
                       "parameters": {"r": 0.25, "alpha": 0.4}},
        "nearswap": {"merge_method": "nearswap", **base, "models": [_model(d, "ft2")],
                     "parameters": {"t": 0.0015}},
        "arcee_fusion": {"merge_method": "arcee_fusion", **base, "models": [_model(d, "ft3")]},
        "passthrough_slices": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": f"./models/{d}/ft3", "layer_range": [0, 2]}]},
            {"sources": [{"model": f"./models/{d}/base", "layer_range": [1, 3]}]}]},
    }
    return {f"{d}_{name}": {**cfg, "dtype": DTYPES[d][1]} for name, cfg in cases.items()}


def write_inputs() -> None:
    """The half-precision models, rounded once from the fp32 ones."""
    for d, names in ROUNDED.items():
        dtype, dtype_name = DTYPES[d]
        for name in names:
            src, dst = GOLDEN / "models" / "fp32" / name, GOLDEN / "models" / d / name
            dst.mkdir(parents=True, exist_ok=True)
            tensors = {k: v.to(dtype) for k, v in load_file(str(src / "model.safetensors")).items()}
            save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
            config = json.loads((src / "config.json").read_text())
            config["torch_dtype"] = dtype_name
            (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            for extra in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copyfile(src / extra, dst / extra)


def write_configs() -> list[str]:
    names = []
    for d in DTYPES:
        for case, cfg in case_configs(d).items():
            folder = GOLDEN / "cases" / case
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "config.yml").write_text(yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None))
            names.append(case)
    return names


def run_mergekit(mergekit: str, case: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        subprocess.run([mergekit, f"cases/{case}/config.yml", str(out), "--random-seed", "42",
                        "--no-copy-tokenizer", "--no-write-model-card"], cwd=GOLDEN, env=env, check=True,
                       stdout=subprocess.DEVNULL)
        golden = GOLDEN / "cases" / case / "golden"
        golden.mkdir(exist_ok=True)
        for kept in ("model.safetensors", "config.json"):
            shutil.copyfile(out / kept, golden / kept)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mergekit", required=True,
                    help="mergekit-yaml of mergekit 0.1.5 (scripts/mergekit_venv.sh)")
    ap.add_argument("cases", nargs="*",
                    help="case folders to regenerate (default: every half-precision case)")
    args = ap.parse_args()
    write_inputs()
    generated = write_configs()
    for case in args.cases or generated:
        run_mergekit(args.mergekit, case)
        print(case)


if __name__ == "__main__":
    main()
