"""streammerge against the I/O floor, a naive in-memory merge and mergekit, on 7B-shaped checkpoints.

    python benchmarks/compare.py --layers 2 4 8 --methods linear task_arithmetic ties dare_ties slerp \\
        [--repeat 3] [--max-memory 512M] [--mergekit .venv-mergekit/bin/mergekit-yaml] [--cgroup-limit 2GiB] \\
        [--before REF] [--skip-naive] [--json out.json] [--png rss.png]

For each layer count it generates (once, cached) base, ft1 and ft2 with Llama-2-7B tensor shapes
(hidden 4096, intermediate 11008, vocab 32000, bf16, 2 GB shards like Hugging Face checkpoints;
fine-tunes are the base plus small correlated deltas). Then, for each method, every tool runs in a
child process after the inputs are evicted from the page cache (fsync + POSIX_FADV_DONTNEED), and
the run records peak RSS (the child's ru_maxrss, and anonymous + file-backed RSS sampled from
/proc), wall and CPU time, and how much the page cache grew.

- **I/O floor**, measured in the same run: reading every input byte once from a cold cache, plus
  writing the output's size of non-zero bytes and fdatasync-ing it.
- **Time to a durable output**: streammerge fsyncs before it returns; mergekit and the naive merge do
  not, so their outputs are fsynced after they exit and that time is added. The time without the
  final sync is reported too (streammerge's own sync time is taken from its summary line).
- **naive**: ``naive_merge.py``, every model loaded whole with ``load_file``, merged, ``save_file``.
- **mergekit**: ``mergekit-yaml`` on the same config (``scripts/mergekit_venv.sh`` installs one),
  when ``--mergekit`` is given; otherwise "mergekit: not installed".
- ``--repeat N``: streammerge's default run and the I/O floor are measured N times and their
  medians reported (with each run's numbers in the JSON): a shared VM's timings and the
  allocator's peaks vary from run to run by more than the targets' margins. Every repeat's output
  must be byte-identical to the first.
- ``--max-memory``: streammerge again with that budget; its output must be byte-identical.
- ``--before REF``: streammerge as of git commit REF too (checked out in a temporary worktree, run
  with ``PYTHONPATH`` pointing at it), the same runs as the current code (with ``--max-memory`` as
  well), in the same session: before and after, on the same disk and page cache. Its output must
  be byte-identical to the current code's.
- CPU: user and system seconds, CPU seconds per GB of input and cores busy (CPU seconds over wall
  seconds) per run: on two cores a merge keeps up with a disk reading 1 GB/s only below about
  1.8 CPU-s per GB.
- ``--cgroup-limit``: the ties merge at the largest layer count once more inside a memory cgroup
  with that limit (page cache counts against it), where the machine allows one.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).parent))
from workload import GiB, MODELS, ensure_inputs, evict, fsync_tree, measure  # noqa: E402

METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "della", "slerp")
TARGET_FLOOR = 1.2  # wall time to a durable output, over the same run's I/O floor
TARGET_CPU_PER_GB = {"linear": 1.0, "task_arithmetic": 1.0, "slerp": 1.0,
                     "ties": 1.6, "dare_ties": 1.6, "della": 1.6}
TARGET_PEAK_GIB = 0.5
TARGET_VS_MERGEKIT = {"ties": 0.2, "dare_ties": 0.2}
BLOCK = 8 << 20


def plan(method: str, base: Path, ft1: Path, ft2: Path) -> dict:
    """A mergekit config (JSON is YAML): both tools run the same file."""
    def model(path: Path, **params: float) -> dict:
        return {"model": str(path), **({"parameters": params} if params else {})}

    if method == "linear":
        return {"merge_method": "linear", "models": [model(p, weight=1 / 3) for p in (base, ft1, ft2)], "dtype": "bfloat16"}
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": str(base), "models": [model(base), model(ft1)],
                "parameters": {"t": 0.5}, "dtype": "bfloat16"}
    sparse = {"density": 0.5} if method in ("ties", "dare_ties") else {}
    if method == "della":
        sparse = {"density": 0.5, "epsilon": 0.1}
    return {"merge_method": method, "base_model": str(base), "models": [model(p, weight=0.5, **sparse) for p in (ft1, ft2)],
            "dtype": "bfloat16"}


def inputs_of(method: str, dirs: list[Path]) -> list[Path]:
    return dirs[:2] if method == "slerp" else dirs


def safetensors_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


# ----------------------------------------------------------------------------- the I/O floor


def cold_read_seconds(d: Path) -> float:
    """Read every safetensors byte of ``d`` once, from a cold page cache."""
    evict([d])
    buf = bytearray(BLOCK)
    t0 = time.perf_counter()
    for f in sorted(d.glob("*.safetensors")):
        fd = os.open(f, os.O_RDONLY)
        try:
            while os.readv(fd, [buf]):
                pass
        finally:
            os.close(fd)
    seconds = time.perf_counter() - t0
    evict([d])
    return seconds


def durable_write_seconds(path: Path, nbytes: int) -> float:
    """Write ``nbytes`` of non-zero data to ``path`` and fdatasync it."""
    block = (os.urandom(1 << 20) * (BLOCK >> 20))
    t0 = time.perf_counter()
    fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
    try:
        left = nbytes
        while left:
            left -= os.write(fd, block[: min(left, BLOCK)])
        os.fdatasync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t0
    path.unlink()
    return seconds


# ----------------------------------------------------------------------------- the runs


def shard_hashes(out: Path) -> dict[str, str]:
    hashes = {}
    for f in sorted(out.glob("*.safetensors")):
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while block := fh.read(BLOCK):
                h.update(block)
        hashes[f.name] = h.hexdigest()
    return hashes


def run_tool(tool: str, cmd: list[str], out: Path, inputs: list[Path], work: Path, cgroup: Path | None = None,
             tree: Path | None = None) -> dict:
    """``tree``: run streammerge as checked out there (in it: ``python -m`` puts the working
    directory first on sys.path, before PYTHONPATH)."""
    evict(inputs)
    log = work / f"{tool.replace('/', '_')}.log"
    env = None if tree is None else {"PYTHONPATH": str(tree)}
    row = {"tool": tool, **measure(cmd, log, cgroup, env, cwd=tree)}
    text = log.read_text(errors="replace")
    row["ok"] = row["exit_code"] == 0 and any(out.rglob("*.safetensors"))
    if not row["ok"]:
        print(f"{tool} failed (exit {row['exit_code']}): {' '.join(cmd)}\n{text[-3000:]}", file=sys.stderr)
    own_sync = re.search(r"\(([\d.]+) s of it syncing", text)
    row["post_sync_s"] = fsync_tree(out) if row["ok"] else 0.0
    row["durable_s"] = row["wall_s"] + row["post_sync_s"]
    row["no_final_sync_s"] = row["wall_s"] - (float(own_sync.group(1)) if own_sync else 0.0)
    return row


def io_floor(layers: int, args: argparse.Namespace) -> tuple[list[Path], dict[Path, float], float]:
    """The inputs for ``layers`` (generated once), each one's cold-read seconds, and the seconds of a
    durable write of the output's size (the base's): medians of ``args.repeat`` measurements."""
    root = ensure_inputs(args.cache_dir, layers)
    dirs = [root / m for m in MODELS]
    out_bytes = safetensors_bytes(dirs[0])
    reads = [{d: cold_read_seconds(d) for d in dirs} for _ in range(args.repeat)]
    writes = [durable_write_seconds(args.cache_dir / "floor-write.tmp", out_bytes) for _ in range(args.repeat)]
    read_s = {d: statistics.median(r[d] for r in reads) for d in dirs}
    write_s = statistics.median(writes)
    print(f"{layers}L: cold read {', '.join(f'{d.name} {s:.1f} s' for d, s in read_s.items())}; "
          f"durable write of {out_bytes / 1e9:.2f} GB {write_s:.1f} s", file=sys.stderr)
    return dirs, read_s, write_s


def median_row(runs: list[dict]) -> dict:
    """One row for repeated runs of a tool: each measurement's median, and every run's in ``runs``."""
    numbers = [k for k, v in runs[0].items() if type(v) in (int, float) and k not in ("layers", "exit_code")]
    middle = sorted(runs, key=lambda r: r["durable_s"])[len(runs) // 2]  # whose timeline is plotted
    row = {**middle, **{k: statistics.median(r[k] for r in runs) for k in numbers},
           "ok": all(r["ok"] for r in runs), "repeats": len(runs), "runs": [{k: r[k] for k in numbers} for r in runs]}
    if row["ok"]:
        row["identical_to_default"] = all(r["identical_to_default"] for r in runs)
    return row


def bench(layers: int, methods: list[str], args: argparse.Namespace, work: Path) -> list[dict]:
    dirs, read_s, write_s = io_floor(layers, args)
    rows = []
    for method in methods:
        ins = inputs_of(method, dirs)
        plan_file = work / f"{method}-{layers}L.yaml"
        plan_file.write_text(json.dumps(plan(method, *dirs), indent=2))
        floor = sum(read_s[d] for d in ins) + write_s
        info = {"layers": layers, "method": method, "floor_s": floor, "input_gb": sum(map(safetensors_bytes, ins)) / 1e9}
        out = args.cache_dir / "out" / f"{method}-{layers}L"
        sm = [sys.executable, "-m", "streammerge", "run", str(plan_file), str(out), "--overwrite"]
        compare = args.compare_layers is None or layers in args.compare_layers
        runs = []
        versions = [("", None)]
        if args.before:
            versions.append((f" (before: {args.before})", args.before_tree))
        for label, tree in versions:
            runs.append((f"streammerge{label}", sm, tree))
            if args.max_memory and compare:
                budget = ["--max-memory", args.max_memory]
                runs.append((f"streammerge --max-memory {args.max_memory}{label}", sm + budget, tree))
        if compare and not args.skip_naive:
            runs.append(("naive", [sys.executable, str(Path(__file__).parent / "naive_merge.py"), method,
                                   str(out / "model.safetensors"), *map(str, ins)], None))
        if args.mergekit and compare:
            mergekit = [str(args.mergekit), str(plan_file), str(out), "--random-seed", "0"]
            runs.append(("mergekit", mergekit, None))
        reference = None
        for tool, cmd, tree in runs:
            repeated = []
            repeats = args.repeat if tool in ("streammerge", f"streammerge (before: {args.before})") else 1
            for _ in range(repeats):
                shutil.rmtree(out, ignore_errors=True)
                if tool == "naive":
                    out.mkdir(parents=True)
                row = {**info, **run_tool(tool, cmd, out, ins, work, tree=tree)}
                checked = args.max_memory and compare or args.repeat > 1 or args.before
                if tool.startswith("streammerge") and row["ok"] and checked:
                    hashes = shard_hashes(out)
                    reference = reference or hashes
                    row["identical_to_default"] = hashes == reference
                per_gb = row["cpu_s"] / row["input_gb"]
                print(f"  {layers}L {method:<15} {tool:<28} {row['durable_s']:7.1f} s  "
                      f"{per_gb:.2f} CPU-s/GB  peak {row['peak_anon_file_gib']:.2f} GiB", file=sys.stderr)
                repeated.append(row)
            rows.append(median_row(repeated) if len(repeated) > 1 else repeated[0])
        shutil.rmtree(out, ignore_errors=True)
    return rows


def cgroup_run(layers: int, limit: str, args: argparse.Namespace, work: Path) -> dict:
    """The ties merge inside a memory cgroup limited to ``limit`` (v2 or v1), or why it could not run."""
    limit_bytes = _size(limit)
    for root, marker, limit_file, peak_file in ((Path("/sys/fs/cgroup"), "cgroup.controllers", "memory.max", "memory.peak"),
                                                (Path("/sys/fs/cgroup/unified"), "cgroup.controllers", "memory.max", "memory.peak"),
                                                (Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes", "memory.limit_in_bytes",
                                                 "memory.max_usage_in_bytes")):
        if not (root / marker).is_file() or (marker == "cgroup.controllers" and "memory" not in (root / marker).read_text()):
            continue  # not a cgroup hierarchy with the memory controller
        group = root / f"streammerge-bench-{os.getpid()}"
        try:
            group.mkdir()
            (group / limit_file).write_text(str(limit_bytes))
        except OSError:
            if group.exists():
                group.rmdir()
            continue
        try:
            dirs = [ensure_inputs(args.cache_dir, layers) / m for m in MODELS]
            plan_file = work / f"cgroup-ties-{layers}L.yaml"
            plan_file.write_text(json.dumps(plan("ties", *dirs), indent=2))
            out = args.cache_dir / "out" / f"cgroup-ties-{layers}L"
            row = run_tool("streammerge", [sys.executable, "-m", "streammerge", "run", str(plan_file), str(out), "--overwrite"],
                           out, dirs, work, cgroup=group)
            peak = (group / peak_file).read_text().strip() if (group / peak_file).exists() else "0"
            shutil.rmtree(out, ignore_errors=True)
            return {"layers": layers, "limit": limit, "cgroup": str(root), "ok": row["ok"], "exit_code": row["exit_code"],
                    "cgroup_peak_gib": int(peak) / GiB, "peak_rss_gib": row["peak_rss_gib"], "wall_s": row["wall_s"]}
        finally:
            group.rmdir()
    return {"layers": layers, "limit": limit, "ok": False, "error": "no writable memory cgroup on this machine"}


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMG]i?B?|)\s*", text, re.I)
    if not m:
        raise SystemExit(f"not a size: {text}")
    unit = m.group(2).upper().rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "KI": 2**10, "MI": 2**20, "GI": 2**30}[unit]
    return int(float(m.group(1)) * scale)


# ----------------------------------------------------------------------------- report


def table(rows: list[dict]) -> str:
    mk = {(r["layers"], r["method"]): r["durable_s"] for r in rows if r["tool"] == "mergekit" and r["ok"]}
    lines = ["| layers | method | tool | peak RSS GiB (ru_maxrss) | peak anon+file GiB | wall s (durable) | wall s (no final sync) "
             "| × I/O floor | CPU s | system s | CPU-s per GB in | cores busy | × mergekit "
             "| page cache growth GiB |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        tool = r["tool"] + ("" if r["ok"] else f" (FAILED, exit {r['exit_code']})")
        if r.get("repeats", 1) > 1:
            tool += f" (median of {r['repeats']}{'' if r.get('identical_to_default', True) else ', DIFFERENT BYTES'})"
        elif "identical_to_default" in r and r["tool"] != "streammerge":
            tool += " (identical)" if r["identical_to_default"] else " (DIFFERENT BYTES)"
        vs = mk.get((r["layers"], r["method"]))
        ratio = f"{r['durable_s'] / vs:.2f}" if vs else "–"
        lines.append(f"| {r['layers']} | {r['method']} | {tool} | {r['peak_rss_gib']:.2f} | {r['peak_anon_file_gib']:.2f} "
                     f"| {r['durable_s']:.1f} | {r['no_final_sync_s']:.1f} "
                     f"| {r['durable_s'] / r['floor_s']:.2f} "
                     f"| {r['cpu_s']:.1f} | {r['sys_s']:.1f} | {r['cpu_s'] / r['input_gb']:.2f} "
                     f"| {r['cpu_s'] / r['wall_s']:.2f} | {ratio} | {r['cache_growth_gib']:.2f} |")
    return "\n".join(lines)


def _spread(rows: list[dict], key: str, unit: str) -> str:
    """The range of ``key`` over each row's repeated runs, when it has them."""
    if rows[0].get("repeats", 1) == 1:
        return ""
    ranges = [f"{min(x[key] for x in r['runs']):.2f}-{max(x[key] for x in r['runs']):.2f}" for r in rows]
    return f" [runs: {', '.join(ranges)} {unit}]"


def verdicts(rows: list[dict], mergekit: bool) -> list[str]:
    """Each target of the full-scale issue, met or not, with the numbers: per streammerge run of
    the current code, CPU-s per GB, wall over the floor, peak RSS, and the bytes against the
    default run (and the code before, with ``--before``)."""
    out = []
    for r in rows:
        if not r["tool"].startswith("streammerge") or "(before:" in r["tool"] or not r["ok"]:
            continue
        cpu, x, peak = r["cpu_s"] / r["input_gb"], r["durable_s"] / r["floor_s"], r["peak_anon_file_gib"]
        want = TARGET_CPU_PER_GB[r["method"]]
        line = (f"{r['layers']}L {r['method']} {r['tool']}: {cpu:.2f} CPU-s/GB (target <= {want}: "
                f"{'met' if cpu <= want else 'NOT met'}), {x:.2f}x the I/O floor (target <= {TARGET_FLOOR}: "
                f"{'met' if x <= TARGET_FLOOR else 'NOT met'}), peak {peak:.2f} GiB (<= {TARGET_PEAK_GIB}: "
                f"{'met' if peak <= TARGET_PEAK_GIB else 'NOT met'})" + _spread([r], "durable_s", "s"))
        before = next((b for b in rows if b["tool"] == f"{r['tool']} (before: {args_before(rows)})"
                       and b["layers"] == r["layers"] and b["method"] == r["method"] and b["ok"]), None)
        if before is not None:
            b_cpu, b_floor = before["cpu_s"] / before["input_gb"], before["durable_s"] / before["floor_s"]
            cpu_x, wall_x = r["cpu_s"] / before["cpu_s"], r["durable_s"] / before["durable_s"]
            line += f"; before {b_cpu:.2f} CPU-s/GB, {b_floor:.2f}x"
            line += f" ({cpu_x:.2f}x the CPU, {wall_x:.2f}x the wall)"
        if "identical_to_default" in r or "identical_to_default" in (before or {}):
            same = r.get("identical_to_default", True) and (before or {}).get("identical_to_default", True)
            line += f"; bytes {'identical' if same else 'DIFFERENT'} across runs"
        mk = next((m for m in rows if m["tool"] == "mergekit" and m["ok"] and m["layers"] == r["layers"]
                   and m["method"] == r["method"]), None)
        if mk:
            line += f"; {r['durable_s'] / mk['durable_s']:.2f}x mergekit's time"
        elif not mergekit:
            line += "; mergekit: not installed"
        out.append(line)
    return out


def args_before(rows: list[dict]) -> str | None:
    """The ``--before`` ref the rows were measured against, if any."""
    for r in rows:
        if "(before: " in r["tool"]:
            return r["tool"].split("(before: ", 1)[1].split(")")[0]
    return None


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--png needs matplotlib (pip install 'streammerge[bench]'); skipped", file=sys.stderr)
        return
    groups = sorted({(r["layers"], r["method"]) for r in rows})
    fig, axes = plt.subplots(len(groups), 1, figsize=(8, 2.6 * len(groups)), squeeze=False)
    for ax, (layers, method) in zip(axes[:, 0], groups):
        for r in rows:
            if (r["layers"], r["method"]) == (layers, method) and r["timeline"]:
                ax.plot(*zip(*r["timeline"]), label=r["tool"])
        ax.set_title(f"{method}, {layers} layers")
        ax.set_xlabel("s")
        ax.set_ylabel("RSS anon+file, GiB")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


@contextlib.contextmanager
def before_tree(ref: str | None) -> Iterator[Path | None]:
    """A detached worktree of this repository at ``ref``, removed afterwards (None without a ref)."""
    if ref is None:
        yield None
        return
    repo = Path(__file__).resolve().parent.parent
    tree = Path(tempfile.mkdtemp(prefix="streammerge-before-"))
    subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", str(tree), ref], check=True,
                   capture_output=True)
    try:
        yield tree
    finally:
        subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8], help="decoder layer counts")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/streammerge-bench"), help="generated checkpoints (reused) and outputs")
    ap.add_argument("--repeat", type=int, default=1, help="measure streammerge's default run and the I/O floor this many times; report medians")
    ap.add_argument("--max-memory", help="also run streammerge with this --max-memory and check its bytes, e.g. 512M")
    ap.add_argument("--compare-layers", type=int, nargs="+",
                    help="layer counts at which to run the naive merge, mergekit and --max-memory too (default: all)")
    ap.add_argument("--mergekit", type=Path, help="a mergekit-yaml executable (scripts/mergekit_venv.sh makes one)")
    ap.add_argument("--cgroup-limit", help="also run the ties merge at the largest layer count in a memory cgroup, e.g. 2GiB")
    ap.add_argument("--before", help="also run streammerge as of this git commit (a temporary worktree)")
    ap.add_argument("--skip-naive", action="store_true",
                    help="no naive in-memory merge (it needs every model in RAM)")
    ap.add_argument("--json", type=Path, help="write every measurement here")
    ap.add_argument("--png", type=Path, help="plot RSS over time per tool here (needs matplotlib)")
    args = ap.parse_args()
    args.cache_dir = args.cache_dir.resolve()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed benchmark still removes its worktree
    if args.mergekit is None:
        print("mergekit: not installed (give --mergekit PATH; scripts/mergekit_venv.sh installs it)", file=sys.stderr)
    rows: list[dict] = []
    cgroup = None
    with tempfile.TemporaryDirectory(prefix="streammerge-compare-") as tmp, before_tree(args.before) as tree:
        args.before_tree = tree
        for layers in sorted(args.layers):
            rows += bench(layers, args.methods, args, Path(tmp))
        print(table(rows), flush=True)
        print()
        for line in verdicts(rows, args.mergekit is not None):
            print(line)
        if args.json:
            args.json.write_text(json.dumps({"rows": rows}, indent=2))
        if args.cgroup_limit:
            cgroup = cgroup_run(max(args.layers), args.cgroup_limit, args, Path(tmp))
            print(f"cgroup: {json.dumps(cgroup)}")
    parent = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"(parent peak RSS {parent:.0f} MiB: a floor under every ru_maxrss above)")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "cgroup": cgroup, "parent_peak_rss_mib": parent}, indent=2))
    if args.png:
        plot(rows, args.png)


if __name__ == "__main__":
    main()
