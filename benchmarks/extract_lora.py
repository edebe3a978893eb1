"""Extracting a rank-64 LoRA from a Llama-2-7B-shaped fine-tune: streammerge next to mergekit-extract-lora.

Inputs are workload.py's bf16 checkpoints (``base`` and ``ft1`` for ``--layers`` decoder layers,
generated once under ``--cache-dir`` and reused; ``/work/bench-cache`` holds the 4- and 8-layer
ones). Both tools run the same extraction (``--max-rank 64``, their defaults otherwise: the
embeddings and lm_head saved whole, norms saved whole) as child processes, measured as workload.py
measures (ru_maxrss via wait4, sampled anon/file RSS, wall and CPU time), with the inputs evicted
from the page cache first. Afterwards the two adapters are compared: per module, the largest
difference of the reconstructions B·A relative to mergekit's largest entry.

    python benchmarks/extract_lora.py --layers 8 --mergekit /work/venv-mergekit/bin/mergekit-extract-lora
    python benchmarks/extract_lora.py --layers 2 --dims 256 688 1000 --mergekit ...   # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload import FULL, GiB, ensure_inputs, evict, measure  # noqa: E402

RANK = 64


def child_extract(ft: Path, base: Path, out: Path, rank: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's streammerge
    from streammerge.lora.extract import ExtractOptions
    from streammerge.lora.extraction import extract_lora

    extract_lora(ft, base, out, ExtractOptions(max_rank=rank), overwrite=True, quiet=True)


def child_compare(mine: Path, theirs: Path) -> None:
    """Print (as JSON) the largest relative difference of the reconstructions, and of the whole tensors."""
    import torch
    from safetensors.torch import load_file

    a, b = load_file(mine / "adapter_model.safetensors"), load_file(theirs / "adapter_model.safetensors")
    worst, whole = 0.0, 0.0
    for key in a:
        if key.endswith(".lora_A.weight"):
            bk = key.replace("lora_A", "lora_B")
            ours, want = a[bk].float() @ a[key].float(), b[bk].float() @ b[key].float()
            worst = max(worst, ((ours - want).abs().max() / want.abs().max()).item())
        elif "lora_" not in key:
            whole = max(whole, (a[key].float() - b[key].float()).abs().max().item())
    print(json.dumps({"same_keys": set(a) == set(b), "reconstruction_rel": worst, "whole_abs": whole}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8, help="decoder layers of the 7B-shaped model")
    ap.add_argument("--cache-dir", type=Path, default=Path("/work/bench-cache"), help="generated inputs")
    ap.add_argument("--dims", type=int, nargs=3, metavar=("HIDDEN", "INTERMEDIATE", "VOCAB"), default=FULL,
                    help="widths (default Llama-2-7B's; smaller ones for a smoke run)")
    ap.add_argument("--rank", type=int, default=RANK)
    ap.add_argument("--mergekit", type=Path, help="a mergekit-extract-lora executable (scripts/mergekit_venv.sh)")
    ap.add_argument("--json", type=Path, help="also write the measurements here")
    ap.add_argument("--child", nargs=3, type=Path, metavar=("FT", "BASE", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("MINE", "THEIRS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_extract(*args.child, args.rank)
        return
    if args.compare:
        child_compare(*args.compare)
        return
    root = ensure_inputs(args.cache_dir.resolve(), args.layers, dims=tuple(args.dims))
    base, ft = root / "base", root / "ft1"
    model_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    runs = [("streammerge", [sys.executable, __file__, "--child", str(ft), str(base), "{out}", "--rank", str(args.rank)])]
    if args.mergekit:
        runs.append(("mergekit", [str(args.mergekit), "--model", str(ft), "--base-model", str(base),
                                  "--out-path", "{out}", "--max-rank", str(args.rank)]))
    else:
        print("mergekit: not installed (give --mergekit PATH; scripts/mergekit_venv.sh installs it)", file=sys.stderr)
    rows, outs = [], {}
    with tempfile.TemporaryDirectory(prefix="extract-lora-") as tmp:
        work = Path(tmp)
        for tool, cmd in runs:
            outs[tool] = work / tool
            evict([base, ft])
            log = work / f"{tool}.log"
            row = {"tool": tool, **measure([c.replace("{out}", str(outs[tool])) for c in cmd], log)}
            if row["exit_code"] != 0:
                print(f"{tool} failed (exit {row['exit_code']}):\n{log.read_text()[-4000:]}", file=sys.stderr)
                sys.exit(1)
            row["adapter_gib"] = (outs[tool] / "adapter_model.safetensors").stat().st_size / GiB
            row.pop("timeline")
            print(f"  {tool}: peak RSS {row['peak_rss_gib']:.2f} GiB, {row['wall_s']:.0f} s", file=sys.stderr)
            rows.append(row)
        agreement = None
        if len(outs) == 2:
            log = work / "compare.log"
            measure([sys.executable, __file__, "--compare", str(outs["streammerge"]), str(outs["mergekit"])], log)
            agreement = json.loads(log.read_text().strip().splitlines()[-1])
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.layers} layers of widths {tuple(args.dims)}; one model {model_bytes / GiB:.2f} GiB (bf16); "
          f"rank {args.rank}\n")
    print("| tool | peak RSS (ru_maxrss, GiB) | peak anon (GiB) | peak file (GiB) | wall s | CPU s | adapter (GiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['tool']} | {r['peak_rss_gib']:.2f} | {r['peak_anon_gib']:.2f} | {r['peak_file_gib']:.2f} "
              f"| {r['wall_s']:.0f} | {r['cpu_s']:.0f} | {r['adapter_gib']:.3f} |")
    if agreement is not None:
        print(f"\nsame tensor names: {agreement['same_keys']}; largest reconstruction difference "
              f"{agreement['reconstruction_rel']:.2e} of mergekit's largest entry; whole tensors differ by at most "
              f"{agreement['whole_abs']:.2e}")
    if args.json:
        args.json.write_text(json.dumps({"layers": args.layers, "dims": args.dims, "rank": args.rank,
                                         "rows": rows, "agreement": agreement}, indent=2))


if __name__ == "__main__":
    main()
