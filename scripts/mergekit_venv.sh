#!/usr/bin/env bash
# A separate virtual environment with mergekit 0.1.5 on torch 2.13.0 (CPU), for benchmarks/compare.py:
#   bash scripts/mergekit_venv.sh [DIR]      (default DIR: .venv-mergekit)
#   python benchmarks/compare.py --mergekit DIR/bin/mergekit-yaml
# torch is installed first, pinned, so mergekit's own requirement does not pull a CUDA build.
set -euo pipefail
dir="${1:-.venv-mergekit}"
python3 -m venv "$dir"
"$dir/bin/pip" install -q --upgrade pip
"$dir/bin/pip" install -q torch==2.13.0
"$dir/bin/pip" install -q "mergekit==0.1.5" "torch==2.13.0"
"$dir/bin/mergekit-yaml" --help > /dev/null
echo "mergekit installed: $dir/bin/mergekit-yaml"
