#!/usr/bin/env bash
# The whole study on the bundled miniature, on a CPU: set-up, then `needlework demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/needlework demo "$@"
