#!/usr/bin/env bash
# Reproduce docs/results.md's first table: for each game, our recipe vs the plain World-Models VAE
# (fg_weight 1, kl_weight 1) under the same budget, scored by `atari-vae evaluate` on 1000 frames
# of fresh episodes. Usage: bash benchmarks/quality.sh [modest|quick|default] [games...]
# RECIPES=ours (or plain) runs one recipe only; the table lists every run under outputs/quality.
set -euo pipefail
cd "$(dirname "$0")/.."
budget=${1:-modest}; shift || true
games=${*:-Breakout Pong}
case "$budget" in
  quick)   flags="--num_episodes 5 --epochs 10 --batch_size 32" ;;
  modest)  flags="--num_episodes 20 --epochs 15 --batch_size 128" ;;
  default) flags="" ;;
  *) echo "budget must be quick, modest or default" >&2; exit 2 ;;
esac
export MLFLOW_DISABLE_TELEMETRY=true
root=outputs/quality/$budget
for game in $games; do
  for recipe in ${RECIPES:-ours plain}; do
    extra=""; [ "$recipe" = plain ] && extra="--fg_weight 1 --kl_weight 1"
    dir=$root/$game-$recipe
    rm -rf "$dir"  # a re-run replaces its own earlier run (train refuses a taken --output_dir)
    start=$(date +%s)
    .venv/bin/atari-vae train --env_name "$game" $flags $extra --output_dir "$dir/train" \
      --checkpoint_freq 1000 --experiment_name atari-vae-quality
    echo "$(( $(date +%s) - start ))" > "$dir/train_seconds.txt"
    .venv/bin/atari-vae evaluate --model_path "$dir/train/best_model.pt" --env_name "$game" \
      --num_samples 1000 --output_dir "$dir/eval" --experiment_name atari-vae-quality
  done
done
.venv/bin/python - "$root" <<'PY'
import json, sys, pathlib
print("| game | recipe | train s | PSNR (base) | accuracy (base) | fg PSNR (base) | fg accuracy (base) |")
print("|---|---|---|---|---|---|---|")
for d in sorted(pathlib.Path(sys.argv[1]).iterdir()):
    m = json.loads((d / "eval" / "metrics.json").read_text())
    secs = (d / "train_seconds.txt").read_text().strip()
    game, recipe = d.name.rsplit("-", 1)
    print(f"| {game} | {recipe} | {secs} | {m['psnr']:.2f} ({m['baseline_psnr']:.2f}) | "
          f"{m['accuracy']:.4f} ({m['baseline_accuracy']:.4f}) | "
          f"{m['fg_psnr']:.2f} ({m['baseline_fg_psnr']:.2f}) | "
          f"{m['fg_accuracy']:.3f} ({m['baseline_fg_accuracy']:.3f}) |")
PY
