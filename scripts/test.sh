#!/usr/bin/env bash
# Set up, then run lint and the test suite (real ALE, real SQLite MLflow, real PostgreSQL).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MLFLOW_DISABLE_TELEMETRY=true
.venv/bin/ruff check atari_vae experiments tests benchmarks
.venv/bin/python -m pytest "$@"
