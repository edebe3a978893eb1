"""Merging from a Hub: download-then-merge against streaming within a disk budget, in one run.

    python benchmarks/hub_stream.py [--layers 8] [--bandwidth 200MB] [--shard-size 500MB] \\
        [--cache-dir DIR] [--json rows.json] [--tiny]

The test Hub (tests/hub_server.py) serves the Llama-2-7B-shaped base and two fine-tunes of
``workload.py`` (bf16, generated once and cached) in place, each request's body throttled to
``--bandwidth`` bytes per second (every run below reads one file or range at a time, so that is
the link's bandwidth). A TIES merge (compare.py's plan, with Hub references) runs in a child
process three ways, each with an empty Hugging Face cache and the inputs evicted from the page
cache:

- **download, then merge**: today's default, every shard into the cache, then the merge;
- **streamed**: ``--disk-budget`` = a third of the inputs' size for the downloads, plus the
  output's size when the download folder is on the output's filesystem (the output is reserved
  on disk from the start and counts against the budget, so a third of the inputs alone, which is
  the output's size for a merge of three models, could never hold it and a shard); shards
  downloaded just in time into ``--download-dir`` and deleted after use;
- **stream-inputs**: ``--stream-inputs`` with ``--disk-budget`` = the output's size, less than
  the output plus the largest shard, which downloading needs.

Each row: wall time, download and merge seconds (from the merge's ``MergeResult``), the peak disk
of the Hugging Face cache or download folder plus the output (sampled in a thread), peak RSS, the
bytes the Hub sent, and whether the output's shards have the first run's sha256. Checks, exit 1
when one fails: the streamed wall ≤ 1.15 × max(download s, merge s) of the first run, each
budgeted run's peak disk ≤ its budget, every output byte-identical. ``--shard-size`` (default
500 MB) is the inputs' shard size: a third of the inputs must hold a shard of each model at once,
and the next ones ahead. ``--tiny`` builds small Llama-shaped models (hidden 512) for a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))  # the test Hub
from compare import plan, safetensors_bytes, shard_hashes  # noqa: E402
from hub_server import UNSET, HubServer, hub_environment  # noqa: E402
from workload import FULL, MODELS, ensure_inputs, evict, measure  # noqa: E402

TINY = (512, 1376, 4000)  # hidden, intermediate, vocabulary of --tiny models
SAMPLES = 200_000  # at most this many disk samples per run (every 0.05 s: about 3 hours)
OVERLAP_TARGET = 1.15
CHILD = """import json, sys, streammerge
r = streammerge.merge(sys.argv[1], sys.argv[2], quiet=True, **json.loads(sys.argv[3]))
json.dump({"download_s": r.download_seconds, "merge_s": r.merge_seconds}, open(sys.argv[4], "w"))
"""


def size(text: str) -> int:
    """Bytes from "200MB", "4MB", "1.5GB" or a plain number (powers of 1000, as
    ``--disk-budget``). Parsed here: importing streammerge imports torch, and the measuring
    parent must stay small (see workload.py)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)b?\s*", text, re.IGNORECASE)
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 200MB")
    return int(float(m.group(1)) * 1000 ** " kmgt".index(m.group(2).lower() or " "))


def tree_bytes(paths: list[Path], suffix: str = "") -> int:
    """Bytes of the files under ``paths`` whose names end with ``suffix``: links (the cache's
    snapshot entries) count as links, files vanishing meanwhile count nothing."""
    total = 0
    for path in paths:
        for folder, _, files in os.walk(path):
            for f in files:
                if f.endswith(suffix):
                    try:
                        total += os.lstat(os.path.join(folder, f)).st_size
                    except FileNotFoundError:
                        pass
    return total


class DiskPeak:
    """The most bytes seen at once under ``downloads`` plus the shards under ``outputs`` (what a
    disk budget counts: the record, card and journal beside them are not), sampled in a thread
    until ``stop``."""

    def __init__(self, downloads: list[Path], outputs: list[Path]):
        self.downloads, self.outputs, self.peak = downloads, outputs, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for _ in range(SAMPLES):
            self.peak = max(self.peak, self._bytes())
            if self._stop.wait(0.05):
                return

    def _bytes(self) -> int:
        return tree_bytes(self.downloads) + tree_bytes(self.outputs, ".safetensors")

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self._bytes())


def run(name: str, hub: HubServer, plan_file: Path, out: Path, options: dict, watched: list[Path],
        inputs: list[Path], work: Path) -> dict:
    """One merge in a child process with an empty Hugging Face cache: its row. The peak disk
    counts the output's shards (staged, then renamed) and the files under ``watched``."""
    home = work / "hf_home"
    shutil.rmtree(home, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    os.environ.update(hub_environment(hub, home))
    evict(inputs)
    result = work / f"{name}.json"
    result.unlink(missing_ok=True)
    sent = sum(r.sent for r in hub.requests())
    staging = out.parent / f".{out.name}.streammerge-partial"
    disk = DiskPeak(watched, [staging, out])
    row = {"run": name, **measure([sys.executable, "-c", CHILD, str(plan_file), str(out),
                                   json.dumps(options), str(result)], work / f"{name}.log")}
    row["peak_disk"] = disk.stop()
    row["hub_sent"] = sum(r.sent for r in hub.requests()) - sent
    row["budget"] = options.get("disk_budget")
    row["ok"] = row["exit_code"] == 0 and result.is_file()
    if not row["ok"]:
        print(f"{name} failed (exit {row['exit_code']}):\n"
              f"{(work / f'{name}.log').read_text(errors='replace')[-3000:]}", file=sys.stderr)
        return row
    row |= json.loads(result.read_text())
    row["hashes"] = shard_hashes(out)
    shutil.rmtree(home, ignore_errors=True)  # the downloads of the first run go with it
    return row


def table(rows: list[dict], inputs: int) -> str:
    gb = 1e9
    lines = ["| run | wall s | download s | merge s | peak disk GB | budget GB | peak RSS GiB "
             "| Hub sent / inputs | identical |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["ok"]:
            lines.append(f"| {r['run']} | failed (exit {r['exit_code']}) | | | | | | | |")
            continue
        budget = "" if r["budget"] is None else f"{r['budget'] / gb:.2f}"
        lines.append(f"| {r['run']} | {r['wall_s']:.1f} | {r['download_s']:.1f} | "
                     f"{r['merge_s']:.1f} | {r['peak_disk'] / gb:.2f} | {budget} | "
                     f"{r['peak_rss_gib']:.2f} | {r['hub_sent'] / inputs:.2f} | "
                     f"{r['identical']} |")
    return "\n".join(lines)


def checks(rows: list[dict]) -> list[tuple[str, bool]]:
    first, streamed = rows[0], rows[1]
    out = [(f"{r['run']}: ran", r["ok"]) for r in rows]
    if first["ok"] and streamed["ok"]:
        bound = OVERLAP_TARGET * max(first["download_s"], first["merge_s"])
        out.append((f"streamed wall {streamed['wall_s']:.1f} s <= {OVERLAP_TARGET} x "
                    f"max(download {first['download_s']:.1f} s, merge {first['merge_s']:.1f} s) "
                    f"= {bound:.1f} s", streamed["wall_s"] <= bound))
    for r in rows[1:]:
        if r["ok"]:
            out.append((f"{r['run']}: peak disk {r['peak_disk']:,} <= budget {r['budget']:,}",
                        r["peak_disk"] <= r["budget"]))
            out.append((f"{r['run']}: byte-identical to {first['run']}", r["identical"]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--bandwidth", type=size, default="200MB", help="bytes per second, e.g. 200MB")
    ap.add_argument("--shard-size", type=size, help="the inputs' shard size (default 500MB; 4MB "
                    "with --tiny)")
    ap.add_argument("--cache-dir", type=Path,
                    default=Path(tempfile.gettempdir()) / "streammerge-bench")
    ap.add_argument("--tiny", action="store_true",
                    help=f"hidden/intermediate/vocab {TINY}: a smoke run")
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args()
    shard_size = args.shard_size or size("4MB" if args.tiny else "500MB")
    root = ensure_inputs(args.cache_dir, args.layers, shard_size, TINY if args.tiny else FULL)
    dirs = [root / m for m in MODELS]
    inputs = sum(map(safetensors_bytes, dirs))
    largest = max(f.stat().st_size for d in dirs for f in d.glob("*.safetensors"))
    for name in UNSET:
        os.environ.pop(name, None)
    hub = HubServer()
    try:
        hub.bytes_per_second = args.bandwidth
        repos = [f"streammerge-bench/{m}-{root.name}" for m in MODELS]
        for repo, d in zip(repos, dirs):
            hub.push(repo, d)
            for f in d.iterdir():  # each file's ETag hashed now, not during the first run
                hub.etag(f)
        work = args.cache_dir / "hub-stream"
        work.mkdir(parents=True, exist_ok=True)
        plan_file = work / "plan.json"
        plan_file.write_text(json.dumps(plan("ties", *map(Path, repos)), indent=2))
        out, downloads = work / "out", work / "downloads"
        rows = [run("download, then merge", hub, plan_file, out, {}, [work / "hf_home"], dirs,
                    work)]
        output = safetensors_bytes(out) if rows[0]["ok"] else sum(map(safetensors_bytes, dirs)) // 3
        downloads.mkdir(exist_ok=True)
        same_fs = os.stat(downloads).st_dev == os.stat(work).st_dev
        budget = inputs // 3 + (output if same_fs else 0)
        rows.append(run("streamed, --disk-budget", hub, plan_file, out,
                        {"disk_budget": budget, "download_dir": str(downloads)}, [downloads], dirs,
                        work))
        rows.append(run("--stream-inputs", hub, plan_file, out,
                        {"disk_budget": output, "stream_inputs": True}, [], dirs, work))
    finally:
        hub.stop()
    for r in rows:
        r["identical"] = r["ok"] and rows[0]["ok"] and r["hashes"] == rows[0]["hashes"]
    print(f"{args.layers} layers{' (tiny)' if args.tiny else ''}, inputs {inputs / 1e9:.2f} GB "
          f"(largest shard {largest / 1e9:.2f} GB), output {output / 1e9:.2f} GB, Hub at "
          f"{args.bandwidth / 1e6:.0f} MB/s; streamed budget: a third of the inputs"
          f"{' + the output (same filesystem)' if same_fs else ''}\n")
    print(table(rows, inputs) + "\n")
    results = checks(rows)
    for text, ok in results:
        print(f"{'ok  ' if ok else 'FAIL'} {text}")
    if args.json:
        args.json.write_text(json.dumps([{k: v for k, v in r.items() if k != "timeline"}
                                         for r in rows], indent=2))
    return 0 if all(ok for _, ok in results) else 1


if __name__ == "__main__":
    sys.exit(main())
