"""Regenerate tests/data/golden_moe_build: what mergekit-moe 0.1.5 builds from the configs of
tests/moe_build_cases.py (tiny Llama, Mistral, Qwen2 and Qwen3 stand-ins).

    python3 scripts/make_moe_goldens.py /work/venv-mergekit/bin/mergekit-moe

mergekit-moe comes from the venv scripts/mergekit_venv.sh builds; the models are built by this
interpreter (the one the tests run under), so the tests rebuild the same bytes. Kept per case, a
few KB: mergekit's config.json, ``routers.safetensors`` (every router and shared-expert gate as
written), ``tensors.json`` (dtype, shape and sha256 of every tensor written, in mergekit's layout:
Mixtral's and Qwen3-MoE's experts fused per layer as transformers 5 holds them) and, for a config
with noise_scale, ``noise.json``: mean and standard deviation of (expert - source) / noise_scale
over the noised expert's weights (mergekit's noise is unseeded; the tests compare moments).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from moe_build_cases import CASES, GOLDEN


def sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(
        t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    ).hexdigest()


def describe(tensors: dict[str, torch.Tensor]) -> dict[str, list]:
    return {
        k: [str(t.dtype).removeprefix("torch."), list(t.shape), sha256(t)]
        for k, t in sorted(tensors.items())
    }


def noise_moments(
    out: dict[str, torch.Tensor], source: Path, scale: float, layers: int
) -> dict[str, float]:
    """Moments of mergekit's draw for expert 1: its fused gate/up rows and down_proj against the source."""
    src = load_file(str(source / "model.safetensors"))
    z = []
    for i in range(layers):
        p = f"model.layers.{i}.mlp."
        gate_up = out[p + "experts.gate_up_proj"][1]
        want = torch.cat([src[p + "gate_proj.weight"], src[p + "up_proj.weight"]])
        z += [
            (gate_up - want).flatten(),
            (out[p + "experts.down_proj"][1] - src[p + "down_proj.weight"]).flatten(),
        ]
    draws = torch.cat(z).double() / scale
    return {"mean": draws.mean().item(), "std": draws.std().item(), "count": draws.numel()}


def main(mergekit_moe: str) -> None:
    if GOLDEN.exists():
        shutil.rmtree(GOLDEN)
    for name, case in CASES.items():
        with tempfile.TemporaryDirectory() as tmp:
            config = case.config(Path(tmp))
            out = Path(tmp) / "out"
            seed = ["--random-seed", str(case.seed)] if case.seed is not None else []
            run = subprocess.run(
                [mergekit_moe, str(config), str(out), *seed],
                check=False,
                capture_output=True,
                text=True,
            )
            if run.returncode:
                sys.exit(f"{name}: mergekit-moe failed:\n{run.stderr[-3000:]}")
            tensors = load_file(str(out / "model.safetensors"))
            dest = GOLDEN / name
            dest.mkdir(parents=True)
            config_json = json.loads((out / "config.json").read_text())
            config_json.pop("_name_or_path", None)  # DeepSeek's: this run's temporary path
            (dest / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
            routers = {
                k: v
                for k, v in tensors.items()
                if k.endswith((".gate.weight", "shared_expert_gate.weight"))
            }
            save_file(routers, str(dest / "routers.safetensors"))
            (dest / "tensors.json").write_text(json.dumps(describe(tensors), indent=1) + "\n")
            if "noise_scale" in case.extra:
                layers = json.loads((out / "config.json").read_text())["num_hidden_layers"]
                moments = noise_moments(
                    tensors, Path(tmp) / "m2" / case.family, case.extra["noise_scale"], layers
                )
                (dest / "noise.json").write_text(json.dumps(moments, indent=1) + "\n")
        print(f"{name}: {len(tensors)} tensors", flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
