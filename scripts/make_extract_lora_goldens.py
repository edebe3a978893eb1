"""Regenerate tests/data/extract_lora: mergekit-extract-lora 0.1.5's adapters for the cases of
tests/extract_lora_cases.py (tiny float32 Llama, Mistral and Qwen2 stand-ins).

    bash scripts/mergekit_venv.sh /work/venv-mergekit
    python3 scripts/make_extract_lora_goldens.py /work/venv-mergekit/bin/mergekit-extract-lora

Per case, tests/data/extract_lora/<case>/ keeps mergekit's adapter_model.safetensors and
adapter_config.json; cases.json records each case's options and the sha256 of the input weights
the builders made, so a test notices when they no longer make the same models.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from extract_lora_cases import CASES, build, fingerprint  # noqa: E402

OUT = ROOT / "tests" / "data" / "extract_lora"


def main(tool: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    record = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case, (family, options) in CASES.items():
            base, ft = build(Path(tmp) / case, family)
            out = Path(tmp) / case / "adapter"
            subprocess.run([tool, "--model", str(ft), "--base-model", str(base), "--out-path", str(out),
                            *options], check=True, stdout=subprocess.DEVNULL)
            keep = OUT / case
            shutil.rmtree(keep, ignore_errors=True)
            keep.mkdir()
            shutil.copy(out / "adapter_model.safetensors", keep)
            config = json.loads((out / "adapter_config.json").read_text())
            config["base_model_name_or_path"] = "BASE"  # a temporary path: not part of the golden
            config["target_modules"] = sorted(config["target_modules"])  # a set in mergekit
            (keep / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
            record[case] = {"family": family, "options": options,
                            "inputs": {"base": fingerprint(base), "ft": fingerprint(ft)}}
    (OUT / "cases.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {OUT}: {', '.join(record)}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "mergekit-extract-lora")
