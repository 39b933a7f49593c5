#!/usr/bin/env bash
# Issue 18's mixed-policy comparison: a VAE trained on random-policy episodes against one trained
# on a 50/50 mix of random and controller-played episodes (same game, episodes, epochs, seed),
# each scored by `atari-vae evaluate` on fresh random episodes and on fresh episodes the
# controller plays (states random play rarely reaches). Needs a registered controller in the
# tracking store (benchmarks/plan.sh makes one). Usage:
#   MLFLOW_TRACKING_URI=sqlite:///outputs/plan-loc.db bash benchmarks/mixed_policy.sh [game]
# EPISODES and EPOCHS override the budget (20, 15: the modest budget). PYTHON overridable.
set -euo pipefail
cd "$(dirname "$0")/.."
game=${1:-Breakout}
lower=$(echo "$game" | tr '[:upper:]' '[:lower:]')
py=${PYTHON:-.venv/bin/python}
export MLFLOW_DISABLE_TELEMETRY=true
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}
controller="models:/atari-vae-$lower-controller@champion"
root=outputs/mixed
for data in random mixed; do
  dir=$root/$game-$data
  mix=()
  [ "$data" = mixed ] && mix=(--collect_policy "$controller" --policy_mix 0.5)
  [ -f "$dir/train/final_model.pt" ] || $py -m atari_vae train --env_name "$game" \
    --num_episodes "${EPISODES:-20}" --epochs "${EPOCHS:-15}" "${mix[@]}" \
    --output_dir "$dir/train" --checkpoint_freq 1000 --experiment_name atari-vae-mixed
  for frames in random controller; do
    played=()
    [ "$frames" = controller ] && played=(--collect_policy "$controller")
    $py -m atari_vae evaluate --model_path "$dir/train/best_model.pt" --env_name "$game" \
      --probe_frames 0 "${played[@]}" --output_dir "$dir/eval-$frames" \
      --experiment_name atari-vae-mixed
  done
done
$py - "$root" "$game" <<'EOF'
import json, sys
from pathlib import Path
root, game = Path(sys.argv[1]), sys.argv[2]
print("| trained on | scored on | fg accuracy (mean frame) | PSNR dB (mean frame) | object recall |")
print("|---|---|---|---|---|")
for data in ("random", "mixed"):
    for frames in ("random", "controller"):
        m = json.loads((root / f"{game}-{data}" / f"eval-{frames}" / "metrics.json").read_text())
        print(f"| {data} | {frames}-played | {m['fg_accuracy']:.3f} ({m['baseline_fg_accuracy']:.3f})"
              f" | {m['psnr']:.2f} ({m['baseline_psnr']:.2f}) | {m['object_recall']:.3f} |")
EOF
