#!/usr/bin/env bash
# Creates .venv and installs needlework with its test extras. Safe to re-run: it installs
# only what is missing. torch goes first, pinned to the CPU build, so that no package pulls a
# multi-GB CUDA build of torch as a dependency.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    $PIP install --quiet "torch==2.13.0"
fi
stamp=.venv/.needlework-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    $PIP install --quiet -e ".[test]"
    touch "$stamp"
fi
