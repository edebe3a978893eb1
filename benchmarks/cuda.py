"""streammerge on the CPU and on a CUDA GPU against the I/O floor, on 7B-shaped checkpoints, in one run.

    python benchmarks/cuda.py --layers 8 --methods ties dare_ties slerp --devices cpu cuda [--json out.json]

Llama-2-7B tensor shapes cut to ``--layers`` decoder layers (32: the whole model, 3 × 13.5 GB of
input; 8 layers, 3 × 3.8 GB, fits a machine lent for 10-minute commands with 64 GiB of disk).

The inputs, the floor (a cold read of every input byte plus a durable write of the output's size)
and the child-process measurement are ``compare.py``'s. Each merge runs as
``streammerge run ... --device DEVICE`` after the inputs are evicted from the page cache; the
table gives the input merged per second of wall time to a durable output, the ratio to the floor,
the child's peak host RSS (anonymous + file-backed) and its peak GPU memory
(``torch.cuda.max_memory_allocated``, from the run's summary line). The target on an H100 is a wall
time within 1.2× the floor for every method: the GPU's compute hidden behind the I/O.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from compare import inputs_of, io_floor, plan, run_tool, safetensors_bytes  # noqa: E402

METHODS = ("ties", "dare_ties", "slerp")
TARGET_FLOOR = 1.2  # on CUDA


def bench(layers: int, args: argparse.Namespace, work: Path) -> list[dict]:
    dirs, read_s, write_s = io_floor(layers, args.cache_dir)
    rows = []
    for method in args.methods:
        ins = inputs_of(method, dirs)
        plan_file = work / f"{method}-{layers}L.yaml"
        plan_file.write_text(json.dumps(plan(method, *dirs), indent=2))
        info = {"layers": layers, "method": method, "floor_s": sum(read_s[d] for d in ins) + write_s,
                "input_gb": sum(map(safetensors_bytes, ins)) / 1e9}
        for device in args.devices:
            out = args.cache_dir / "out" / f"{method}-{layers}L-{device}"
            shutil.rmtree(out, ignore_errors=True)
            tool = f"streammerge --device {device}"
            cmd = [sys.executable, "-m", "streammerge", "run", str(plan_file), str(out), "--overwrite", "--device", device]
            if args.max_memory:
                cmd += ["--max-memory", args.max_memory]
            row = {**info, "device": device, **run_tool(tool, cmd, out, ins, work)}
            gpu = re.search(r"peak GPU memory ([\d.]+) GiB", (work / f"{tool}.log").read_text(errors="replace"))
            row["peak_gpu_gib"] = float(gpu.group(1)) if gpu else None
            print(f"  {layers}L {method:<10} {device:<5} {row['durable_s']:7.1f} s  {row['durable_s'] / row['floor_s']:.2f}x floor",
                  file=sys.stderr)
            rows.append(row)
            shutil.rmtree(out, ignore_errors=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| layers | method | device | input GB | GB/s of input merged | wall s (durable) | × I/O floor | peak host RSS GiB "
             "(anon+file) | peak GPU memory GiB |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        device = r["device"] + ("" if r["ok"] else f" (FAILED, exit {r['exit_code']})")
        gpu = "–" if r["peak_gpu_gib"] is None else f"{r['peak_gpu_gib']:.2f}"
        lines.append(f"| {r['layers']} | {r['method']} | {device} | {r['input_gb']:.2f} | {r['input_gb'] / r['durable_s']:.2f} "
                     f"| {r['durable_s']:.1f} | {r['durable_s'] / r['floor_s']:.2f} | {r['peak_anon_file_gib']:.2f} | {gpu} |")
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r["device"] == "cuda":
            x = r["durable_s"] / r["floor_s"]
            out.append(f"{r['layers']}L {r['method']} on cuda: {x:.2f}x the I/O floor "
                       f"(target <= {TARGET_FLOOR}x: {'met' if r['ok'] and x <= TARGET_FLOOR else 'NOT met'})")
    floors = {(r["layers"], r["method"]): r["floor_s"] for r in rows}
    out += [f"I/O floor {layers}L {method}: {s:.1f} s" for (layers, method), s in floors.items()]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[8], help="decoder layer counts (32: the whole 7B shape)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--devices", nargs="+", default=["cpu", "cuda"], choices=["cpu", "cuda"])
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/streammerge-bench"), help="generated checkpoints (reused) and outputs")
    ap.add_argument("--max-memory", help="streammerge's --max-memory for every run, e.g. 2GiB")
    ap.add_argument("--json", type=Path, help="write every measurement here")
    args = ap.parse_args()
    args.cache_dir = args.cache_dir.resolve()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="streammerge-cuda-") as tmp:
        for layers in sorted(args.layers):
            rows += bench(layers, args, Path(tmp))
    print(table(rows), flush=True)
    print()
    for line in verdicts(rows):
        print(line)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=2))


if __name__ == "__main__":
    main()
