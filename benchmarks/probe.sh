#!/usr/bin/env bash
# Issue 13's figures: the state probe and the object metric at the modest budget, and what of
# the ball survives the 64x64 preprocessing. Usage:
#   bash benchmarks/probe.sh [games...]            # default: Breakout
#   VARIANTS="ours freebits obj30 broadcast+obj30" bash benchmarks/probe.sh Breakout
#   DEFAULTS=1 SURVIVAL=0 bash benchmarks/probe.sh Breakout    # at the default settings
# Each variant trains `atari-vae train --num_episodes 20 --epochs 15` (+ its flags) and is scored
# by `atari-vae evaluate` (1000 scored frames, 20,000 probe frames, both from fresh episodes);
# the table lists every run under outputs/probe. PYTHON and ATARI_VAE overridable.
# Reference rows without a model: $PYTHON benchmarks/probe.py baselines --game Pong
set -euo pipefail
cd "$(dirname "$0")/.."
games=${*:-Breakout}
py=${PYTHON:-.venv/bin/python}
vae=${ATARI_VAE:-.venv/bin/atari-vae}
export MLFLOW_DISABLE_TELEMETRY=true
root=outputs/probe
for game in $games; do
  if [ "${SURVIVAL:-1}" = 1 ]; then  # SURVIVAL=0 skips it when comparing variants
    $py benchmarks/probe.py survival --game "$game" --frames 20000  # the probe's own frames
  fi
  for variant in ${VARIANTS:-ours}; do
    extra=""
    for part in ${variant//+/ }; do  # broadcast+obj30: --decoder broadcast --obj_weight 30
      case "$part" in
        ours) ;;
        freebits) extra="$extra --free_bits 0.5" ;;
        obj*) extra="$extra --obj_weight ${part#obj}" ;;
        broadcast) extra="$extra --decoder broadcast" ;;
        kl*) extra="$extra --kl_weight ${part#kl}" ;;
        loc*) extra="$extra --loc_weight ${part#loc}" ;;
        *) echo "variant parts: ours, freebits, broadcast, obj<w>, loc<w>, kl<w>" >&2
           exit 2 ;;
      esac
    done
    epochs=${EPOCHS:-15}  # EPOCHS=60: longer runs, named <game>-<variant>-60ep
    dir=$root/$game-$variant$([ "$epochs" = 15 ] || echo "-${epochs}ep")
    budget="--num_episodes 20 --epochs $epochs"
    if [ "${DEFAULTS:-0}" = 1 ]; then  # the project's default settings: <game>-<variant>-default
      budget="" dir=$root/$game-$variant-default
    fi
    [ -f "$dir/train/final_model.pt" ] || $vae train --env_name "$game" $budget $extra \
      --output_dir "$dir/train" --checkpoint_freq 1000 --experiment_name atari-vae-probe
    $vae evaluate --model_path "$dir/train/best_model.pt" --env_name "$game" \
      --output_dir "$dir/eval" --experiment_name atari-vae-probe
  done
done
$py benchmarks/probe.py table "$root"/*/eval
