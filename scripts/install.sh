#!/usr/bin/env bash
# Set up streammerge, every optional extra and the test dependencies on a fresh machine.
# torch first: the pinned CPU wheel where no torch is installed (a bare `torch` requirement would
# pull several GB of CUDA packages); an installed torch is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install --quiet torch==2.13.0
fi
"$PY" -m pip install --quiet -e ".[test,eval,data,plot]"
"$PY" -c "import torch, streammerge; print(f'streammerge {streammerge.__version__} with torch {torch.__version__}')"
