"""The Ray executor against the local one on the 7B-shaped TIES merge, in one run.

    python benchmarks/scaleout.py [--layers 8] [--shard-size 500MB] [--repeat 2] \\
        [--cache-dir DIR] [--json rows.json]

The merge is compare.py's TIES plan (bf16, base + 2 fine-tunes of ``workload.py``'s Llama-2-7B
shapes, generated once and cached), written in ``--shard-size`` output shards so that there are
tasks to spread. Each run is a child process (``streammerge run``) with the inputs evicted from
the page cache first:

- **local**: ``--executor local`` (a thread per core);
- **ray, 1 node**: ``--executor ray`` on a Ray cluster of one node with every core, started
  before the timing (a scale-out user's cluster is up before the merge);
- **ray, 2 nodes**: a head and a worker node of one core each, on this machine.

Each row: wall time (median of ``--repeat``), its ratio to the local run, the driver's peak RSS,
the tasks' largest peak RSS, and the throughput a task reached (input bytes read and merged per
second of task time, per core) — the per-node figure the README's scale model starts from. The
cluster's start-up is timed too, once. Checks, exit 1 when one fails: the one-node Ray run within
1.2× the local run's wall time, every output byte-identical to the local run's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from compare import plan, safetensors_bytes, shard_hashes  # noqa: E402
from hub_stream import size  # noqa: E402
from workload import MODELS, ensure_inputs, evict, measure  # noqa: E402

OVERHEAD_TARGET = 1.2
NODE = {"object_store_memory": 150 << 20}
CHILD = """import dataclasses, json, sys, streammerge
r = streammerge.merge(sys.argv[1], sys.argv[2], quiet=True, **json.loads(sys.argv[3]))
tasks = [{k: v for k, v in dataclasses.asdict(t).items() if k != "entries"} for t in r.tasks]
json.dump({"seconds": r.seconds, "read": r.bytes_read, "tasks": tasks}, open(sys.argv[4], "w"))
"""


def start_cluster(cpus_per_node: list[int]):
    """A Ray cluster on this machine, a node per entry; every node on 127.0.0.1, in a short temp
    directory (Ray's socket paths must fit 107 bytes)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    root = Path(tempfile.mkdtemp(prefix="smb", dir="/tmp"))
    (root / "ray").mkdir()
    os.environ["RAY_TMPDIR"] = str(root)
    from ray.cluster_utils import Cluster

    began = time.perf_counter()
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={**NODE, "num_cpus": cpus_per_node[0], "include_dashboard": False})
    for cpus in cpus_per_node[1:]:
        cluster.add_node(**NODE, num_cpus=cpus)
    cluster.wait_for_nodes()
    return cluster, root, time.perf_counter() - began


def run(name: str, plan_path: Path, out: Path, overrides: dict, inputs: list[Path], work: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    evict(inputs)
    result = work / f"{name}.json"
    cmd = [sys.executable, "-c", CHILD, str(plan_path), str(out), json.dumps(overrides), str(result)]
    row = {"run": name, **measure(cmd, work / f"{name}.log")}
    if row["exit_code"] != 0:
        sys.exit(f"{name} failed:\n{(work / f'{name}.log').read_text()[-3000:]}")
    row |= json.loads(result.read_text())
    row["hashes"] = shard_hashes(out)
    return row


def per_core_throughput(row: dict) -> float:
    """Input bytes per second of task time, per core: a Ray task has one core; the local run
    has every core of the machine for the whole run."""
    if row["tasks"]:
        return sum(t["bytes_read"] for t in row["tasks"]) / sum(t["seconds"] for t in row["tasks"])
    return row["read"] / row["wall_s"] / os.cpu_count()


def table(rows: list[dict], local_wall: float) -> str:
    head = ("run", "wall s", "vs local", "driver RSS GiB", "task RSS GiB", "tasks", "nodes",
            "MB/s per core", "identical")
    lines = []
    for r in rows:
        tasks = r["tasks"]
        ray = (f"{max(t['peak_rss'] for t in tasks) / 2**30:.2f}", str(len(tasks)),
               str(len({t['node'] for t in tasks}))) if tasks else ("-", "-", "-")
        lines.append((r["run"], f"{r['wall_s']:.1f}", f"{r['wall_s'] / local_wall:.2f}x",
                      f"{r['peak_rss_gib']:.2f}", *ray, f"{per_core_throughput(r) / 1e6:.0f}",
                      "yes" if r["identical"] else "NO"))
    widths = [max(len(c) for c in col) for col in zip(head, *lines)]
    return "\n".join("  ".join(c.ljust(w) if k == 0 else c.rjust(w)
                               for k, (c, w) in enumerate(zip(cells, widths)))
                     for cells in (head, *lines))


# The scale model's cluster: nodes of NODE_CORES cores, each with a NODE_LINK bytes/s link to a
# shared filesystem that serves SHARED_FS bytes/s in all (a 25 GbE link; a mid-size parallel
# filesystem). A TIES merge reads the base and two fine-tunes and writes one model (bf16).
NODE_CORES, NODE_LINK, SHARED_FS = 16, 3.1e9, 10e9
MODEL_BYTES = {"70B": 68.98e9 * 2, "405B": 405.85e9 * 2}  # Llama-2-70B's and Llama-3.1-405B's parameters
SCALE_NODES = (1, 4, 16)
SCALE_SHARDS = (5e9, 1e9)  # --shard-size: 5 GB (mergekit's default) and 1 GB


def predicted(model_bytes: float, nodes: int, shard: float, per_core: float) -> tuple[dict[str, float], int]:
    """Seconds each resource needs for a TIES merge of three ``model_bytes`` models on ``nodes``
    nodes (the wall time is the largest), and the tasks that run at once. A task (one output
    shard, one core) reads three times its shard at ``per_core`` bytes/s; tasks run in waves of
    the cluster's cores; reads and writes share each node's link and the shared filesystem.
    Start-up and the tail of unequal shards are left out (measured above: seconds)."""
    read, written = 3 * model_bytes, model_bytes
    tasks = -(-model_bytes // shard)
    slots = min(tasks, nodes * NODE_CORES)
    return {"cores": -(-tasks // slots) * 3 * shard / per_core,
            "node links": (read + written) / (nodes * NODE_LINK),
            "shared filesystem": (read + written) / SHARED_FS}, int(slots)


def scale_model(per_core: float) -> str:
    head = ("model", "shard", "nodes", "tasks at once", "cores min", "links min", "shared FS min",
            "bound by")
    lines = []
    for name, nbytes in MODEL_BYTES.items():
        for shard in SCALE_SHARDS:
            for nodes in SCALE_NODES:
                need, slots = predicted(nbytes, nodes, shard, per_core)
                lines.append((name, f"{shard / 1e9:.0f} GB", str(nodes), str(slots),
                              *(f"{v / 60:.1f}" for v in need.values()), max(need, key=need.get)))
    widths = [max(len(c) for c in col) for col in zip(head, *lines)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
                     for cells in (head, *lines))


def median_of(runs: list[dict]) -> dict:
    row = dict(sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2])
    row["wall_s"] = statistics.median(r["wall_s"] for r in runs)
    row["identical"] = all(r["identical"] for r in runs)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--shard-size", type=size, default=size("500MB"), help="output shards (default 500MB)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--cache-dir", type=Path,
                    default=Path(os.environ.get("STREAMMERGE_BENCH_CACHE", "/work/bench-cache")))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    root = ensure_inputs(args.cache_dir, args.layers)
    inputs = [root / m for m in MODELS]
    work = Path(tempfile.mkdtemp(prefix="scaleout-", dir=args.cache_dir))
    plan_path = work / "plan.json"
    plan_path.write_text(json.dumps(plan("ties", *inputs) | {"shard_size": args.shard_size}))
    out = work / "out"
    print(f"{args.layers}L TIES: {sum(safetensors_bytes(d) for d in inputs) / 1e9:.1f} GB in, "
          f"shards of {args.shard_size / 1e9:.2f} GB out; {os.cpu_count()} cores", file=sys.stderr)

    rows, startup = [], {}
    try:
        local = [run(f"local-{k}", plan_path, out, {}, inputs, work) for k in range(args.repeat)]
        reference = local[0]["hashes"]
        for r in local:
            r["identical"] = r["hashes"] == reference
        rows.append(median_of(local) | {"run": "local"})
        for name, nodes in (("ray, 1 node", [os.cpu_count()]), ("ray, 2 nodes", [1, 1])):
            cluster, temp, startup[name] = start_cluster(nodes)
            try:
                over = {"executor": "ray", "ray_address": cluster.address}
                tag = name.replace(", ", "-").replace(" ", "")
                runs = [run(f"{tag}-{k}", plan_path, out, over, inputs, work) for k in range(args.repeat)]
            finally:
                cluster.shutdown()
                shutil.rmtree(temp, ignore_errors=True)
            for r in runs:
                r["identical"] = r["hashes"] == reference
            rows.append(median_of(runs) | {"run": name})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    local_wall = rows[0]["wall_s"]
    print(table(rows, local_wall))
    print("cluster start-up (not in the wall times): "
          + ", ".join(f"{name} {s:.1f} s" for name, s in startup.items()))
    per_core = per_core_throughput(rows[1])
    print(f"\nscale model: {per_core / 1e6:.0f} MB/s read and merged per core (ray, 1 node), "
          f"nodes of {NODE_CORES} cores with {NODE_LINK / 1e9:.1f} GB/s links, a shared "
          f"filesystem of {SHARED_FS / 1e9:.0f} GB/s:\n{scale_model(per_core)}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "startup_s": startup}, indent=1))
    overhead = rows[1]["wall_s"] / local_wall
    failed = [f"ray, 1 node: {overhead:.2f}x the local wall time (target {OVERHEAD_TARGET}x)"
              for _ in [0] if overhead > OVERHEAD_TARGET]
    failed += [f"{r['run']}: output differs from the local run's" for r in rows if not r["identical"]]
    for f in failed:
        print(f"FAILED {f}", file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
