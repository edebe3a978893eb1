"""The safetensors header fuzz tests of tests/test_reader.py with many more examples than CI runs.

    python benchmarks/fuzz_headers.py --examples 50000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=50_000, help="hypothesis examples per fuzz test")
    args = ap.parse_args()
    env = os.environ | {"STREAMMERGE_FUZZ_EXAMPLES": str(args.examples), "PYTHONPATH": str(ROOT)}
    sys.exit(subprocess.run([sys.executable, "-m", "pytest", "-q", "-k", "fuzz", "-p", "no:cacheprovider",
                             "--hypothesis-show-statistics", str(ROOT / "tests" / "test_reader.py")], env=env).returncode)
