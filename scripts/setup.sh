#!/usr/bin/env bash
# Create .venv and install atari-vae with its test tools. Idempotent; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# Pin torch first: an unpinned torch can pull a multi-GB CUDA build. On our CPU machines
# 2.13.0 is a CPU wheel on disk; elsewhere set TORCH_SPEC (e.g. "torch>=2.4") to choose.
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e ".[dev]"
