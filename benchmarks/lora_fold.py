"""Folding a rank-64 LoRA adapter into a Llama-2-7B-shaped model, against a plain merge of the same model.

Inputs are workload.py's generated bf16 checkpoints (base, ft1, ft2 for ``--layers`` decoder layers;
generated once, reused) plus a random PEFT-layout LoRA adapter of rank 64 on q/k/v/o/gate/up/down
of every layer (float32, alpha 128), and two more adapters with other seeds. Each run is a child
process, measured as workload.py measures (ru_maxrss via wait4, sampled anon/file RSS, wall, CPU),
with the input files evicted from the page cache first; the child also reports the bytes it read
through read/pread calls (``rchar`` of /proc/self/io, which counts page-cache hits too):

- ``linear``: the plain merge, base and ft1 at weight 0.5 (reads two models);
- ``fold``: ``base_model`` + ``adapters: [adapter]`` (reads the base once and the adapter);
- ``task_arithmetic x3``: three adapters of the same base at weight 0.5 (reads the base once, not three times).

    python benchmarks/lora_fold.py --layers 4 --json lora_fold.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload import GiB, HIDDEN, INTERMEDIATE, INDEX, MODELS, ensure_inputs, evict, measure  # noqa: E402

RANK, ALPHA = 64, 128
TARGETS = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN), "self_attn.v_proj": (HIDDEN, HIDDEN),
           "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (INTERMEDIATE, HIDDEN), "mlp.up_proj": (INTERMEDIATE, HIDDEN),
           "mlp.down_proj": (HIDDEN, INTERMEDIATE)}
ADAPTERS = 3


def make_adapter(path: Path, layers: int, seed: int) -> None:
    """A PEFT LoRA adapter directory with random factors (B nonzero, as after training)."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for module, (out_features, in_features) in TARGETS.items():
            key = f"base_model.model.model.layers.{i}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, in_features, generator=g) / in_features**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, RANK, generator=g) * 1e-3
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": sorted({m.split(".")[1] for m in TARGETS}),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "task_type": "CAUSAL_LM"}))


def child_run(plan: Path, out: Path) -> None:
    """Merge in this process, then print the bytes it read (the parent parses the last line)."""
    import streammerge

    streammerge.merge(plan, out, overwrite=True, quiet=True)
    rchar = next(int(line.split()[1]) for line in Path("/proc/self/io").read_text().splitlines() if line.startswith("rchar"))
    print(json.dumps({"rchar": rchar}))


def plans(root: Path, adapters: list[Path], work: Path) -> dict[str, Path]:
    base, ft1 = root / "base", root / "ft1"
    docs = {
        "linear": {"merge_method": "linear", "dtype": "bfloat16",
                   "models": [{"model": str(base), "parameters": {"weight": 0.5}}, {"model": str(ft1), "parameters": {"weight": 0.5}}]},
        "fold": {"base_model": str(base), "adapters": [{"path": str(adapters[0])}]},
        f"task_arithmetic x{ADAPTERS}": {"base_model": str(base), "adapters": [{"path": str(a), "weight": 0.5} for a in adapters]},
    }
    out = {}
    for name, doc in docs.items():
        out[name] = work / f"{name.replace(' ', '')}.yaml"
        out[name].write_text(json.dumps(doc))  # JSON is YAML
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the 7B-shaped model")
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/streammerge-bench"), help="generated inputs (shared with compare.py)")
    ap.add_argument("--json", type=Path, help="also write the measurements here")
    ap.add_argument("--adapter", nargs=3, metavar=("DIR", "LAYERS", "SEED"), help=argparse.SUPPRESS)
    ap.add_argument("--child", nargs=2, type=Path, metavar=("PLAN", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.adapter:
        make_adapter(Path(args.adapter[0]), int(args.adapter[1]), int(args.adapter[2]))
        return
    if args.child:
        child_run(*args.child)
        return
    cache = args.cache_dir.resolve()
    root = ensure_inputs(cache, args.layers)
    adapters = [cache / f"lora-r{RANK}-{args.layers}L-{k}" for k in range(ADAPTERS)]
    for k, a in enumerate(adapters):
        if not (a / "adapter_config.json").is_file():
            subprocess.run([sys.executable, __file__, "--adapter", str(a), str(args.layers), str(k)], check=True)
    model_bytes = sum(f.stat().st_size for f in (root / "base").glob("*.safetensors"))
    adapter_bytes = (adapters[0] / "adapter_model.safetensors").stat().st_size
    rows = []
    with tempfile.TemporaryDirectory(prefix="lora-fold-") as tmp:
        work = Path(tmp)
        for name, plan in plans(root, adapters, work).items():
            evict([root / m for m in MODELS] + adapters)
            out, log = cache / "out" / f"lora-{name.replace(' ', '')}", work / f"{name}.log"
            row = {"run": name, **measure([sys.executable, __file__, "--child", str(plan), str(out)], log)}
            lines = log.read_text().strip().splitlines()
            if row["exit_code"] != 0 or not lines:
                print(f"{name} failed (exit {row['exit_code']}):\n{log.read_text()[-4000:]}", file=sys.stderr)
                sys.exit(1)
            row["read_gib"] = json.loads(lines[-1])["rchar"] / GiB
            row["output_gib"] = sum(f.stat().st_size for f in out.glob("*.safetensors")) / GiB
            shutil.rmtree(out, ignore_errors=True)
            print(f"  {name}: peak RSS {row['peak_rss_gib']:.2f} GiB, read {row['read_gib']:.2f} GiB, {row['wall_s']:.0f} s", file=sys.stderr)
            rows.append(row)
    print(f"{args.layers} layers; one model {model_bytes / GiB:.2f} GiB (bf16), one rank-{RANK} adapter {adapter_bytes / GiB:.3f} GiB (fp32)\n")
    print("| run | peak RSS (ru_maxrss, GiB) | peak anon (GiB) | peak file (GiB) | read (GiB) | read / model | wall s | CPU s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['run']} | {r['peak_rss_gib']:.2f} | {r['peak_anon_gib']:.2f} | {r['peak_file_gib']:.2f} | {r['read_gib']:.2f} "
              f"| {r['read_gib'] * GiB / model_bytes:.2f} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"layers": args.layers, "model_bytes": model_bytes, "adapter_bytes": adapter_bytes, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
