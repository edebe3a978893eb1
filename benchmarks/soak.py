"""Soak test of crash safety: back-to-back merges SIGKILLed at random moments, resumed until done.

It writes a base and three fine-tunes (Llama-shaped, float32, small enough to merge in seconds),
runs one uninterrupted ``streammerge run`` as the reference, then merges the same plan into the
same output ``--merges`` times. Each merge is started as a child process (the real command line)
and, on up to ``--max-kills`` attempts, SIGKILLed at a uniformly random moment of the reference's
wall time (import, scheduling, writing, finalizing); the command is then simply run again, as a
user would, until it exits 0. Every finished output must pass ``streammerge verify`` and equal the
reference byte for byte (every file). Exits 1 if one does not.

    python benchmarks/soak.py --merges 20 --seed 0
"""

from __future__ import annotations

import argparse
import hashlib
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import yaml  # noqa: E402

from checkpoint_builder import Arch, write_family  # noqa: E402

ARCH = Arch(hidden=256, intermediate=688, layers=4, vocab=4000, heads=8, kv_heads=4)


def digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}


def command(plan: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "streammerge", "run", str(plan), str(out)]


def merge_with_kills(plan: Path, out: Path, budget_s: float, max_kills: int, rng: random.Random) -> tuple[list[float], list[int]]:
    """Run until the merge exits 0, killing it on the first ``max_kills`` attempts at random
    moments; returns the kill times and, per finished or resumed attempt, how many tensors it resumed."""
    kills: list[float] = []
    resumed: list[int] = []
    while True:
        proc = subprocess.Popen(command(plan, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if len(kills) < max_kills:
            at = rng.uniform(0, budget_s)
            try:
                proc.wait(timeout=at)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills.append(round(at, 2))
                continue
        stderr = proc.communicate()[1]
        if proc.returncode != 0:
            raise SystemExit(f"merge failed (exit {proc.returncode}): {stderr.strip()}")
        found = re.search(r"resumed: (\d+) of", stderr)
        resumed.append(int(found.group(1)) if found else 0)
        return kills, resumed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--merges", type=int, default=20)
    ap.add_argument("--max-kills", type=int, default=3, help="kills per merge at most (then it is let finish)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="streammerge-soak-"))
    try:
        family = write_family(root / "models", ARCH)
        plan = root / "plan.yaml"
        plan.write_text(yaml.safe_dump({
            "merge_method": "ties", "base_model": str(family.base), "shard_size": "8MB", "chunk_size": 64 * 256,
            "models": [{"model": str(m), "parameters": {"weight": 0.4, "density": 0.5}} for m in family.models]}))
        out = root / "out"
        started = time.perf_counter()
        subprocess.run(command(plan, out) + ["-q"], check=True)
        reference_s = time.perf_counter() - started
        reference = digests(out)
        print(f"reference: {len(reference)} files, {sum(p.stat().st_size for p in out.iterdir()) / 2**20:.1f} MiB, "
              f"{reference_s:.1f} s uninterrupted")
        failures = 0
        all_kills = 0
        for i in range(args.merges):
            shutil.rmtree(out)
            kills, resumed = merge_with_kills(plan, out, reference_s, args.max_kills, rng)
            all_kills += len(kills)
            verified = subprocess.run([sys.executable, "-m", "streammerge", "verify", str(out)], capture_output=True, text=True)
            same = digests(out) == reference
            failures += verified.returncode != 0 or not same
            print(f"merge {i + 1:2d}: killed at {kills or 'never'} s; resumed {resumed[-1]} tensors; "
                  f"verify {'ok' if verified.returncode == 0 else 'FAILED: ' + verified.stderr.strip()}; "
                  f"{'identical' if same else 'DIFFERENT'} to the reference")
        print(f"soak: {args.merges} merges, {all_kills} SIGKILLs, {args.merges - failures} verified and byte-identical, "
              f"{failures} failed")
        sys.exit(1 if failures else 0)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
