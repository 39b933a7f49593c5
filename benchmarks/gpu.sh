#!/usr/bin/env bash
# The prepared GPU check: on a CUDA machine, the device-sensitive tests, then Breakout at the
# default settings on the GPU, then evaluate on two sets of fresh episodes (seed 10000 with the
# state probe, 20000 the pixels alone). Prints wall time, images/s and the held-out figures;
# meant to finish in under 8 minutes.
#
#   bash benchmarks/gpu.sh                   # python3 must import torch (CUDA) and atari_vae's deps
#   PYTHON=.venv/bin/python bash benchmarks/gpu.sh
#   GPU_CHECK_TESTS=0 GPU_CHECK_DIR=outputs/gpu-eager TRAIN_FLAGS="--cuda_graph off" \
#     EVAL_FLAGS="--probe_frames 0" bash benchmarks/gpu.sh   # the same run without CUDA graphs
#   GPU_CHECK_GAME=Pong bash benchmarks/gpu.sh   # another game at the defaults
#   GPU_CHECK_DEVICE=cpu TRAIN_FLAGS="--num_episodes 3 --max_steps 60 --epochs 1" \
#     EVAL_FLAGS="--num_samples 50 --max_steps 60" bash benchmarks/gpu.sh   # dry run of the script
#
# On a machine without a package index, carry the dependencies as wheels for its Python
# (`bash benchmarks/gpu_wheels.sh .whl 3.12` here), install them there first
# (`pip install --no-index --no-deps --target DIR .whl/*.whl` and PYTHONPATH=DIR).
# Figures of a run on an H200: benchmarks/README.md, "Time to quality".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=$(realpath -m "${GPU_CHECK_DIR:-outputs/gpu-check}")
DEVICE=${GPU_CHECK_DEVICE:-cuda}
GAME=${GPU_CHECK_GAME:-Breakout}
export MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$OUT_DIR/mlflow.db}
export ATARI_VAE_CACHE_DIR=${ATARI_VAE_CACHE_DIR:-$OUT_DIR/frame-cache}
mkdir -p "$OUT_DIR"

if [ "$DEVICE" != cpu ]; then
  "$PY" -c 'import sys, torch
sys.exit(0 if torch.cuda.is_available() else "no CUDA device here: benchmarks/gpu.sh is for a GPU machine")'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c 'import torch; print("torch", torch.__version__, "on", torch.cuda.get_device_name())'
fi

if [ "${GPU_CHECK_TESTS:-1}" != 0 ]; then
  echo "== device-sensitive tests"
  "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_runtime.py tests/test_model.py \
    tests/test_cuda_graph.py
fi

echo "== $GAME, default settings ${TRAIN_FLAGS:-}, --device $DEVICE"
started=$(date +%s.%N)
# shellcheck disable=SC2086  # the flags are meant to split
"$PY" -m atari_vae train --env_name "$GAME" --device "$DEVICE" --output_dir "$OUT_DIR/train" \
  --experiment_name gpu-check ${TRAIN_FLAGS:-} 2>&1 | tee "$OUT_DIR/train.log"
ended=$(date +%s.%N)

for seed in 10000 20000; do
  echo "== evaluate on fresh episodes, seed $seed"
  probe=$([ "$seed" = 20000 ] && echo "--probe_frames 0" || true)
  # shellcheck disable=SC2086
  "$PY" -m atari_vae evaluate --model_path "$OUT_DIR/train/best_model.pt" --device "$DEVICE" \
    --env_name "$GAME" --seed "$seed" --output_dir "$OUT_DIR/eval-$seed" \
    --experiment_name gpu-check ${EVAL_FLAGS:-} $probe > "$OUT_DIR/eval-$seed.log" 2>&1
  cat "$OUT_DIR/eval-$seed/metrics.txt"
done

echo "gpu.sh took $SECONDS s"
"$PY" - "$OUT_DIR" "$started" "$ended" <<'EOF'
import json, re, sys
from pathlib import Path

out, started, ended = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
log = (out / "train.log").read_text()
frames = int(re.search(r"(\d+) train / \d+ val frames", log).group(1))
epoch_seconds = [float(s) for s in re.findall(r"epoch \d+/\d+ .* ([\d.]+)s$", log, re.M)]
print(f"train wall {ended - started:.1f} s (collection, MLflow and files included)")
if epoch_seconds:
    print(f"epochs {len(epoch_seconds)}, {sum(epoch_seconds):.1f} s, "
          f"{frames * len(epoch_seconds) / sum(epoch_seconds):,.0f} images/s incl. validation "
          f"(first epoch {epoch_seconds[0]:.1f} s, later ones {min(epoch_seconds):.1f}-"
          f"{max(epoch_seconds[1:] or epoch_seconds):.1f} s)")
graphed = re.search(r"replay one CUDA graph from step (\d+)", log)
print("steps: " + (f"replayed from a CUDA graph from step {graphed.group(1)} on" if graphed
                   else "eager (no CUDA graph)"))
for seed in (10000, 20000):
    doc = json.loads((out / f"eval-{seed}" / "metrics.json").read_text())
    scores = next(iter(doc["games"].values())) if "games" in doc else doc
    keys = ("psnr", "baseline_psnr", "fg_accuracy", "baseline_fg_accuracy", "object_recall",
            "probe_score", "probe_score_random_init", "probe_f1_ball_x", "probe_f1_ball_y")
    print(f"held-out seed {seed}: " + ", ".join(f"{k} {scores[k]:.4g}" for k in keys if k in scores))
EOF
