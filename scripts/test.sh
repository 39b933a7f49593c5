#!/usr/bin/env bash
# Set up, then run lint and the test suite (real ALE, real SQLite MLflow, real PostgreSQL).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MLFLOW_DISABLE_TELEMETRY=true
.venv/bin/ruff check atari_vae experiments tests benchmarks
# Two workers (pytest-xdist) keep both cores busy: most tests run one-threaded torch or wait on
# a subprocess. A file stays on one worker, so its module fixtures (servers, trained models)
# start once. PYTEST_WORKERS=0 runs in this process.
.venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
