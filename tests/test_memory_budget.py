"""A `--max-memory` below what the merge needs fails at planning, giving the smallest budget that works.

Budgets are checked in fresh processes, as a user runs them: the process's own size is part of the
prediction, and the pytest process's is not a command's.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

import streammerge
from checkpoint_builder import Family

ERROR = re.compile(r"error: max_memory \(--max-memory\) 1000 bytes is below this merge's predicted peak "
                   r"of ([\d.]+) MiB \([\d.]+ MiB process \+ [\d.]+ MiB the smallest chunks' "
                   r"working set\); the smallest budget that works, with 1 MiB of room for the "
                   r"process's own variation, is (\d+)MiB: pass --max-memory \2MiB or more\n")

PEAK = re.compile(r"peak memory   ([\d.]+) MiB predicted")


def _streammerge(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "streammerge", *args], capture_output=True, text=True,
                          env=env, timeout=300)



def test_an_impossible_budget_fails_at_planning_and_the_one_it_names_runs(fp32_family: Family,
                                                                          tmp_path: Path) -> None:
    plan = {"merge_method": "ties", "base_model": str(fp32_family.base),
            "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}}
                       for m in fp32_family.models]}
    (tmp_path / "plan.yml").write_text(yaml.safe_dump(plan))
    refused = _streammerge("run", str(tmp_path / "plan.yml"), str(tmp_path / "tiny"), "--max-memory", "1KB")
    assert refused.returncode == 1 and refused.stdout == ""
    match = ERROR.fullmatch(refused.stderr)
    assert match, refused.stderr
    peak, smallest = float(match[1]), int(match[2])
    # The prediction (shown to 0.1 MiB) plus the room, rounded up.
    assert peak + 1 - 0.05 <= smallest <= peak + 2 + 0.05
    assert not (tmp_path / "tiny").exists() and not list(tmp_path.glob(".tiny*"))

    planned = _streammerge("plan", str(tmp_path / "plan.yml"), "--max-memory", f"{smallest}MiB")
    assert planned.returncode == 0, planned.stderr
    # `streammerge plan` predicts the same peak at that budget.
    predicted = float(PEAK.search(planned.stdout)[1])
    assert abs(predicted - peak) <= 1 and predicted <= smallest

    ran = _streammerge("run", str(tmp_path / "plan.yml"), str(tmp_path / "smallest"), "--max-memory",
                       f"{smallest}MiB", "-q")

    assert ran.returncode == 0, ran.stderr
    streammerge.merge(plan, tmp_path / "default", quiet=True)
    smallest_bytes = (tmp_path / "smallest" / "model.safetensors").read_bytes()
    assert smallest_bytes == (tmp_path / "default" / "model.safetensors").read_bytes()
