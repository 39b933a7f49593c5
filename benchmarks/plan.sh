#!/usr/bin/env bash
# Issue 18's score table: a CMA-ES controller on the champion VAE's z vs the random policy and the
# random-encoder control, on the same 30 fresh test episodes per game. Usage:
#   bash benchmarks/plan.sh [games...]                 # default: Breakout Pong
#   BUDGET=12 bash benchmarks/plan.sh Breakout         # minutes of CMA-ES per controller (default 6,
#                                                      # as in the README table; the job default is 12)
# For each game without a registered atari-vae-<game>@champion in ./mlflow.db it first trains
# the quick-test VAE (5 episodes, 10 epochs, batch 32) and registers it (quality floor and all).
# Then `atari-vae plan` trains ours and the control, tests both and the random policy, and
# registers atari-vae-<game>-controller. Each game's table is outputs/plan-<game>/summary.txt;
# wall times are in its scores.json (metrics) and the MLflow run. PYTHON overridable.
#   VAE_FLAGS="--loc_weight 0" bash benchmarks/plan.sh    # the quick VAE as in the first table
#   VAE_MODEL=outputs/probe/Breakout-loc30-60ep/train/best_model.pt FEATURES=mu_delta \
#     MLFLOW_TRACKING_URI=sqlite:///outputs/plan-loc.db bash benchmarks/plan.sh Breakout
#       registers that model file instead (into its own store), plans with those features
#   PLAN_FLAGS="--generations 40 --time_budget_minutes 0" bash benchmarks/plan.sh Breakout
#       more flags for `atari-vae plan` (here: a generation budget, so that a busy machine
#       slows the job down but does not change its scores); PLAN_OUT=<dir> puts its files there
#       (one game per call)
set -euo pipefail
cd "$(dirname "$0")/.."
games=${*:-Breakout Pong}
if [ -n "${PLAN_OUT:-}" ] && [ "$(echo "$games" | wc -w)" -gt 1 ]; then
  echo "PLAN_OUT names one game's directory; give one game, got: $games" >&2
  exit 2
fi
py=${PYTHON:-.venv/bin/python}
export MLFLOW_DISABLE_TELEMETRY=true
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}
uri=$MLFLOW_TRACKING_URI
for game in $games; do
  lower=$(echo "$game" | tr '[:upper:]' '[:lower:]')
  out=${PLAN_OUT:-outputs/plan-$lower${FEATURES:+-$FEATURES}}
  if ! $py -c "import mlflow, sys; mlflow.set_tracking_uri('$uri'); \
mlflow.MlflowClient().get_model_version_by_alias('atari-vae-$lower', 'champion')" 2>/dev/null
  then
    model=${VAE_MODEL:-outputs/vae-$lower/best_model.pt}
    if [ -z "${VAE_MODEL:-}" ]; then
      # shellcheck disable=SC2086  # VAE_FLAGS is a list of flags
      $py -m atari_vae train --env_name "$game" --num_episodes 5 --epochs 10 --batch_size 32 \
        --output_dir "outputs/vae-$lower" --experiment_name atari-vae-plan ${VAE_FLAGS:-}
    fi
    $py -m atari_vae register --model_path "$model" --env_name "$game" \
      --experiment_name atari-vae-plan
  fi
  # shellcheck disable=SC2086  # PLAN_FLAGS is a list of flags
  /usr/bin/time -f "$game plan wall %e s" $py -m atari_vae plan --env_name "$game" \
    --time_budget_minutes "${BUDGET:-6}" --output_dir "$out" --features "${FEATURES:-mu}" \
    --experiment_name atari-vae-plan ${PLAN_FLAGS:-}
  cat "$out/summary.txt"
done
