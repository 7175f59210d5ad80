#!/usr/bin/env bash
# Submits an experiment to a Ray cluster as a job:
#   scripts/submit.sh experiments/paper/llama3_8b_musique.yaml [key=value ...]
# RAY_ADDRESS defaults to the dashboard tunnel of `ray dashboard cluster.yaml` (localhost:8265).
# Run outputs stay on the cluster's storage (run_dir / train.storage_path in the YAML); fetch
# them with `ray rsync-down cluster.yaml <run_dir> runs/`.
set -euo pipefail
cd "$(dirname "$0")/.."
exp=${1:?usage: scripts/submit.sh EXPERIMENT.yaml [key=value ...]}
shift
export RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
RAY=${RAY:-$( [ -x .venv/bin/ray ] && echo .venv/bin/ray || echo ray )}
env_json=${NEEDLEWORK_RUNTIME_ENV:-'{"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}'}
exec "$RAY" job submit --working-dir . --runtime-env-json "$env_json" ${NEEDLEWORK_NO_WAIT:+--no-wait} \
    -- python -m engine.cli run "$exp" "$@"
