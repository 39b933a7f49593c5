#!/usr/bin/env bash
# Set up, then train a quick Breakout VAE into ./mlflow.db through the MLproject.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate
export MLFLOW_DISABLE_TELEMETRY=true
# A run owns its output directory (a second run into it is refused), so each quickstart gets its own.
out=outputs/quickstart-$(date +%Y%m%d-%H%M%S)
mlflow run . -e train --env-manager local --experiment-name atari-vae \
  -P env_name=Breakout -P num_episodes=5 -P epochs=20 -P batch_size=32 \
  -P output_dir="$out"
exp_id=$(python -c 'import mlflow; mlflow.set_tracking_uri("sqlite:///mlflow.db"); print(mlflow.get_experiment_by_name("atari-vae").experiment_id)')
cat <<EOF

Done. Next steps:
  1. Open the UI:  .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000
     and browse    http://127.0.0.1:5000/#/experiments/${exp_id}/runs?workflowType=machine_learning
  2. Register this model (champion if it passes the quality floor):
       .venv/bin/atari-vae register --model_path $out/best_model.pt
     or tune and register the best trial:  .venv/bin/atari-vae tune --env_name Breakout --n_trials 20
  3. Load it in a planner:  .venv/bin/python -c 'import atari_vae; print(atari_vae.load_registered("atari-vae-breakout"))'
     (experiments/planner_example.py encodes live frames; .venv/bin/atari-vae serve serves it over HTTP)
EOF
