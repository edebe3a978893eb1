"""Peak memory of a streammerge TIES merge against a naive load-everything merge, as the model grows.

For each layer count it generates (once, cached) three Llama-2-7B-shaped bf16 checkpoints, base, ft1
and ft2, as Hugging Face directories with sharded safetensors, then merges ft1 and ft2 onto base with
TIES (weight 0.5, density 0.5) twice, each in its own child process:

- streammerge: ``python -m streammerge run plan.yaml OUT --overwrite -q``;
- naive: this script with ``--naive``, which loads every shard with ``safetensors.torch.load_file``,
  merges in memory tensor by tensor, and saves the whole merged state dict with ``save_file``.

Before each child the input files are evicted from the page cache (fsync + POSIX_FADV_DONTNEED).
Per child it records the peak RSS from the kernel (``ru_maxrss`` of the child, via ``os.wait4``),
the peaks of ``RssAnon``, ``RssFile`` and their sum sampled from /proc/<pid>/status every 50 ms,
the wall time, and the CPU time (user + sys). streammerge's RSS should stay flat as layers are
added (it holds a few tensors at a time); the naive merge's grows with the model.

The parent stays lean on purpose: it never imports torch and generates the inputs in a child too.
subprocess spawns with vfork, and at exec Linux folds the parent's lifetime peak RSS into the
child's ru_maxrss, so a parent that once held gigabytes would inflate every measurement. The
parent's own peak RSS, a floor under every ru_maxrss, is printed with the table.

    python benchmarks/peak_rss.py --layers 2 4 8 --json peak_rss.json

Inputs take about 4.0, 6.4 and 11.3 GB for 2, 4 and 8 layers; merge outputs are removed unless --keep.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HIDDEN, INTERMEDIATE, VOCAB, HEADS = 4096, 11008, 32000, 32
SHARD_BYTES = 2 * 10**9
MODELS = ("base", "ft1", "ft2")
INDEX = "model.safetensors.index.json"
WEIGHT, DENSITY = 0.5, 0.5
GiB = 2**30
SAMPLE_S = 0.05

# ----------------------------------------------------------------------------- synthetic checkpoints


def llama_shapes(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of Llama-2-7B truncated to ``layers`` decoder layers, in HF order."""
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(f"{p}self_attn.{x}_proj.weight", (HIDDEN, HIDDEN)) for x in "qkvo"]
        shapes += [(f"{p}mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)), (f"{p}mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
                   (f"{p}mlp.down_proj.weight", (HIDDEN, INTERMEDIATE))]
        shapes += [(f"{p}input_layernorm.weight", (HIDDEN,)), (f"{p}post_attention_layernorm.weight", (HIDDEN,))]
    return shapes + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def pack_shards(shapes: list[tuple[str, tuple[int, ...]]]) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedily group tensors, in order, into shards of at most SHARD_BYTES of bf16."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def llama_config(layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "num_hidden_layers": layers,
        "num_attention_heads": HEADS, "num_key_value_heads": HEADS, "vocab_size": VOCAB,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "initializer_range": 0.02,
        "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }


def is_generated(root: Path) -> bool:
    return all((root / m / INDEX).is_file() for m in MODELS)


def generate(root: Path, layers: int, seed: int = 0) -> None:
    """Write base/ft1/ft2 under ``root``; the indexes are written last and mark them complete.

    base ~ N(0, 0.02) (norm weights 1 + N(0, 0.02)); ft1 = base + e, ft2 = base + 0.6 e + 0.8 flip(e),
    e ~ N(0, 0.002): deltas of equal scale, elementwise correlation 0.6 (flip pairs distinct elements)."""
    import torch  # here and in naive_ties only: the parent must not grow (see the module docstring)
    from safetensors.torch import save_file

    dirs = [root / m for m in MODELS]
    shards = pack_shards(llama_shapes(layers))
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        (d / INDEX).unlink(missing_ok=True)
        (d / "config.json").write_text(json.dumps(llama_config(layers), indent=2))
    g = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, 1):
        filename = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        out: list[dict[str, torch.Tensor]] = [{}, {}, {}]
        for name, shape in shard:
            base = torch.randn(shape, generator=g).mul_(0.02)
            if name.endswith("norm.weight"):
                base.add_(1.0)
            e = torch.randn(shape, generator=g).mul_(0.002)
            out[0][name] = base.to(torch.bfloat16)
            out[1][name] = (base + e).to(torch.bfloat16)
            out[2][name] = (base + 0.6 * e + 0.8 * e.flip(-1)).to(torch.bfloat16)
            weight_map[name] = filename
            total += 2 * base.numel()
            del base, e
        for d, tensors in zip(dirs, out):
            save_file(tensors, d / filename, metadata={"format": "pt"})
            tensors.clear()
    for d in dirs:
        (d / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def evict(dirs: list[Path]) -> None:
    """Drop the checkpoints' pages from the page cache (fsync first: dirty pages are not dropped)."""
    for d in dirs:
        for f in d.iterdir():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# ----------------------------------------------------------------------------- the naive baseline


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def top_k_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Exactly k largest |x|: those above the k-th largest, then ties at it in flat-index order."""
    a = x.abs().flatten()
    threshold = a.kthvalue(a.numel() - k + 1).values
    keep = a > threshold
    tied = (a == threshold).nonzero().squeeze(1)
    keep[tied[: k - int(keep.sum())]] = True
    return keep.view_as(x)


def naive_ties(base_dir: Path, ft_dirs: list[Path], out_file: Path) -> None:
    """TIES the way a notebook does it: everything in memory, one save_file at the end."""
    import torch
    from safetensors.torch import save_file

    base = load_dir(base_dir)
    fts = [load_dir(d) for d in ft_dirs]
    merged = {}
    for name, b in base.items():
        b32 = b.float()
        deltas = [ft[name].float() - b32 for ft in fts]
        weighted = torch.stack([d * top_k_mask(d, int(DENSITY * d.numel())) * WEIGHT for d in deltas])
        elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
        agree = weighted.sign() == elected
        divisor = (agree * WEIGHT).sum(0)
        divisor[divisor == 0] = 1
        merged[name] = (b32 + (weighted * agree).sum(0) / divisor).to(torch.bfloat16)
    save_file(merged, out_file, metadata={"format": "pt"})


# ----------------------------------------------------------------------------- measurement


def rss_kib(pid: int) -> tuple[int, int]:
    """(RssAnon, RssFile) in KiB from /proc/<pid>/status; zeros once the process is gone or a zombie."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("RssAnon:", "RssFile:")):
                    key, value = line.split(":")
                    fields[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return fields.get("RssAnon", 0), fields.get("RssFile", 0)


def measure(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` as a child; its exit code, ru_maxrss, sampled RSS peaks, wall and CPU time."""
    peaks = {"anon": 0, "file": 0, "sum": 0}
    stop = threading.Event()

    def sample(pid: int) -> None:
        while not stop.is_set():
            anon, file = rss_kib(pid)
            peaks["anon"], peaks["file"] = max(peaks["anon"], anon), max(peaks["file"], file)
            peaks["sum"] = max(peaks["sum"], anon + file)
            stop.wait(SAMPLE_S)

    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    sampler = threading.Thread(target=sample, args=(proc.pid,), daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4; tell Popen
    return {
        "exit_code": proc.returncode,
        "peak_rss_gib": usage.ru_maxrss * 1024 / GiB,
        "peak_anon_gib": peaks["anon"] * 1024 / GiB,
        "peak_file_gib": peaks["file"] * 1024 / GiB,
        "peak_anon_file_gib": peaks["sum"] * 1024 / GiB,
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
    }


def write_plan(path: Path, base: Path, ft1: Path, ft2: Path) -> None:
    models = "".join(f"  - model: {p}\n    parameters: {{weight: {WEIGHT}, density: {DENSITY}}}\n" for p in (ft1, ft2))
    path.write_text(f"merge_method: ties\nbase_model: {base}\nmodels:\n{models}dtype: bfloat16\n")


def bench(layers: int, cache: Path, work: Path, keep: bool) -> tuple[list[dict], float]:
    """Generate (or reuse) the inputs for ``layers`` and measure both tools; rows and generation seconds."""
    root = cache / f"llama2-7b-shape-{layers}L"
    t0 = time.perf_counter()
    if not is_generated(root):
        subprocess.run([sys.executable, __file__, "--generate", str(layers), str(root)], check=True)
    gen_s = time.perf_counter() - t0
    print(f"  {layers}L inputs ready in {gen_s:.1f} s ({root})", file=sys.stderr)
    base, ft1, ft2 = dirs = [root / m for m in MODELS]
    input_gb = sum(f.stat().st_size for d in dirs for f in d.glob("*.safetensors")) / 1e9
    plan = work / f"ties-{layers}L.yaml"
    write_plan(plan, base, ft1, ft2)
    sm_out, naive_out = cache / "out" / f"{layers}L-streammerge", cache / "out" / f"{layers}L-naive"
    naive_out.mkdir(parents=True, exist_ok=True)
    runs = [
        ("streammerge", [sys.executable, "-m", "streammerge", "run", str(plan), str(sm_out), "--overwrite", "-q"],
         sm_out, [sm_out / INDEX, sm_out / "model.safetensors"]),
        ("naive", [sys.executable, __file__, "--naive", str(base), str(ft1), str(ft2), str(naive_out / "model.safetensors")],
         naive_out, [naive_out / "model.safetensors"]),
    ]
    rows = []
    for tool, cmd, out, expected in runs:
        evict(dirs)
        log = work / f"{tool}-{layers}L.log"
        row = {"layers": layers, "tool": tool, **measure(cmd, log), "input_gb": input_gb}
        row["ok"] = row["exit_code"] == 0 and any(p.is_file() for p in expected)
        if not row["ok"]:
            print(f"{tool} at {layers} layers failed (exit {row['exit_code']}): {' '.join(cmd)}\n{log.read_text()[-4000:]}",
                  file=sys.stderr)
        print(f"  {layers}L {tool}: {row['wall_s']:.1f} s, peak RSS {row['peak_rss_gib']:.2f} GiB", file=sys.stderr)
        rows.append(row)
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
    return rows, gen_s


def table(rows: list[dict]) -> str:
    lines = ["| layers | tool | peak RSS (ru_maxrss, GiB) | peak anon RSS (GiB) | peak file RSS (GiB) | peak anon+file (GiB) | wall s | CPU s | input GB |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        tool = r["tool"] if r["ok"] else f"{r['tool']} (FAILED, exit {r['exit_code']})"
        lines.append(f"| {r['layers']} | {tool} | {r['peak_rss_gib']:.2f} | {r['peak_anon_gib']:.2f} | {r['peak_file_gib']:.2f} "
                     f"| {r['peak_anon_file_gib']:.2f} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['input_gb']:.2f} |")
    return "\n".join(lines)


def verdict(rows: list[dict]) -> str:
    sm = sorted((r for r in rows if r["tool"] == "streammerge"), key=lambda r: r["layers"])
    lo, hi = sm[0], sm[-1]
    ratio = hi["peak_rss_gib"] / lo["peak_rss_gib"]
    grows = "grows" if ratio > 1.1 else "does not grow (within 10%)"
    under = all(r["peak_rss_gib"] < 1.5 for r in sm)
    return (f"streammerge peak RSS {grows}: {lo['peak_rss_gib']:.2f} GiB at {lo['layers']} layers -> "
            f"{hi['peak_rss_gib']:.2f} GiB at {hi['layers']} layers (ratio {ratio:.2f}); "
            f"under 1.5 GiB at every size: {'yes' if under else 'NO'}.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8], help="decoder layer counts to benchmark")
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/streammerge-bench"), help="generated checkpoints (reused)")
    ap.add_argument("--json", type=Path, help="also write all measurements here")
    ap.add_argument("--keep", action="store_true", help="keep the merge outputs")
    ap.add_argument("--naive", nargs=4, type=Path, metavar=("BASE", "FT1", "FT2", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--generate", nargs=2, metavar=("LAYERS", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.naive:
        naive_ties(args.naive[0], args.naive[1:3], args.naive[3])
        return
    if args.generate:
        generate(Path(args.generate[1]), int(args.generate[0]))
        return
    rows, gen_s = [], {}
    with tempfile.TemporaryDirectory(prefix="peak-rss-") as tmp:
        for layers in sorted(args.layers):
            layer_rows, gen_s[layers] = bench(layers, args.cache_dir.resolve(), Path(tmp), args.keep)
            rows += layer_rows
    parent_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB
    print(table(rows))
    print()
    print(verdict(rows))
    print(f"(parent peak RSS {parent_gib * 1024:.0f} MiB: a floor under every ru_maxrss above)")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "generate_s": gen_s, "parent_peak_rss_gib": parent_gib}, indent=2))


if __name__ == "__main__":
    main()
