#!/usr/bin/env bash
# Set up, then train a quick Breakout VAE into ./mlflow.db through the MLproject.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate
export MLFLOW_DISABLE_TELEMETRY=true
mlflow run . -e train --env-manager local --experiment-name atari-vae \
  -P env_name=Breakout -P num_episodes=5 -P epochs=10 -P batch_size=32 \
  -P output_dir=outputs/vae_training
echo
echo "Done. Browse the run:  .venv/bin/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///mlflow.db"
echo "then open http://127.0.0.1:5000"
