"""A 4-expert mixture of experts (gate_mode cheap_embed) from the Llama-2-7B-shaped checkpoints,
built by ``streammerge moe`` and by ``mergekit-moe`` from the same config, in the same run.

Inputs are workload.py's generated bf16 checkpoints (base, ft1, ft2 for ``--layers`` decoder
layers; generated once, reused). The experts are ft1, ft2, ft1 and ft2 again, each with prompts of
its own; the base lends attention, norms, embeddings and the prompts' embedding rows. The
generated models have no tokenizer, so the base is given one here: a folder of links to its files
plus a word-level tokenizer of its vocabulary (tests/arch_builder.py's). Each build is a child
process measured as workload.py measures (ru_maxrss via wait4, sampled RSS, wall, CPU), the inputs
evicted from the page cache first; the output is about 2.7x one input model (4 MLPs per layer).

    python benchmarks/moe_build.py --layers 4 8 --cache-dir /work/bench-cache \\
        --mergekit /work/venv-mergekit/bin/mergekit-moe [--max-memory 1GiB] [--json moe.json]

``--dims 64 96 128`` builds tiny-width inputs instead (a smoke run of the script itself). Several
``--layers`` show whether the peak stays flat as the model (and the output) grows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from workload import FULL, MODELS, GiB, ensure_inputs, evict, measure

PROMPTS = [
    ["write a python function", "fix this bug"],
    ["translate to french", "a poem about rain"],
    ["solve the equation", "prove the theorem"],
    ["tell me a story", "once upon a time"],
]


def tokenized_base(base: Path, work: Path, vocab: int) -> Path:
    """``base``'s files, linked, with a word-level tokenizer of ``vocab`` entries written beside them
    (by a child: arch_builder imports torch, and the measuring parent must stay small)."""
    out = work / "base"
    out.mkdir(parents=True)
    for f in base.iterdir():
        (out / f.name).symlink_to(f)
    tests = str(HERE.parent / "tests")
    code = (f"import sys; sys.path.insert(0, {tests!r}); from pathlib import Path; "
            f"from arch_builder import write_word_tokenizer; "
            f"write_word_tokenizer(Path({str(out)!r}), {vocab}, add_bos=True)")
    subprocess.run([sys.executable, "-c", code], check=True)
    return out


def config(base: Path, experts: list[Path], path: Path) -> Path:
    """The mergekit-moe config both tools build (JSON is YAML)."""
    doc = {
        "base_model": str(base),
        "gate_mode": "cheap_embed",
        "dtype": "bfloat16",
        "experts": [
            {"source_model": str(e), "positive_prompts": PROMPTS[k]} for k, e in enumerate(experts)
        ],
    }
    path.write_text(json.dumps(doc, indent=2))
    return path


def build(root: Path, layers: int, args: argparse.Namespace) -> list[dict]:
    """Both tools on the ``layers``-layer inputs under ``root``: one measured row each."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="moe-build-", dir=root.parent) as tmp:
        work = Path(tmp)
        base = tokenized_base(root / "base", work, args.dims[2])
        experts = [root / "ft1", root / "ft2", root / "ft1", root / "ft2"]
        cfg = config(base, experts, work / "moe.yml")
        limit = ["--max-memory", args.max_memory] if args.max_memory else []
        tools = {"streammerge": [sys.executable, "-m", "streammerge", "moe", str(cfg), "OUT", "-q", *limit]}
        if args.mergekit:
            tools["mergekit-moe"] = [str(args.mergekit), str(cfg), "OUT"]
        for tool, cmd in tools.items():
            out, log = work / f"out-{tool}", work / f"{tool}.log"
            evict([root / m for m in MODELS])
            row = {"tool": tool, "layers": layers, **measure([str(out) if c == "OUT" else c for c in cmd], log)}
            if row["exit_code"] != 0:
                sys.exit(f"{tool} failed (exit {row['exit_code']}):\n{log.read_text()[-4000:]}")
            row["output_gib"] = sum(f.stat().st_size for f in out.glob("*.safetensors")) / GiB
            row["input_gib"] = sum(f.stat().st_size for f in (root / "base").glob("*.safetensors")) / GiB
            del row["timeline"]
            shutil.rmtree(out, ignore_errors=True)
            print(f"  {layers} layers, {tool}: peak RSS {row['peak_rss_gib']:.2f} GiB, {row['wall_s']:.1f} s",
                  file=sys.stderr)
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[8],
                    help="decoder layers of the 7B-shaped model; several show whether the peak is flat")
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/streammerge-bench"),
                    help="generated inputs (shared with compare.py)")
    ap.add_argument("--dims", type=int, nargs=3, default=list(FULL), metavar=("HIDDEN", "INTERMEDIATE", "VOCAB"),
                    help="widths of the generated inputs (default Llama-2-7B's)")
    ap.add_argument("--mergekit", type=Path, help="a mergekit-moe executable (scripts/mergekit_venv.sh makes one)")
    ap.add_argument("--max-memory", help="streammerge's --max-memory (default: none)")
    ap.add_argument("--json", type=Path, help="also write the measurements here")
    args = ap.parse_args()
    if args.mergekit is None:
        print("mergekit: not installed (give --mergekit PATH; scripts/mergekit_venv.sh installs it)", file=sys.stderr)
    # this checkout's streammerge in the children, whatever is installed
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))
    cache = args.cache_dir.resolve()
    rows = [r for layers in args.layers
            for r in build(ensure_inputs(cache, layers, dims=tuple(args.dims)), layers, args)]
    print(f"widths {tuple(args.dims)}, bf16; 4 experts (ft1, ft2, ft1, ft2), gate_mode cheap_embed\n")
    print("| layers | tool | one input (GiB) | output (GiB) | peak RSS (ru_maxrss, GiB) | peak anon (GiB) "
          "| peak file (GiB) | wall s | CPU s |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['layers']} | {r['tool']} | {r['input_gib']:.2f} | {r['output_gib']:.2f} | {r['peak_rss_gib']:.2f} "
              f"| {r['peak_anon_gib']:.2f} | {r['peak_file_gib']:.2f} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"dims": args.dims, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
