#!/usr/bin/env bash
# Issue 17's end-to-end figure: three games, 1000 episodes each, one epoch, through the CLI.
#   bash benchmarks/three_games.sh                 # fresh frame cache: collection included
#   CACHE=~/.cache/atari-vae bash benchmarks/three_games.sh   # re-use collected stores
#   EPISODES=5 bash benchmarks/three_games.sh      # a dry run of the script
# Prints the wall time, the peak RSS (GNU time: it counts the store's pages the kernel caches
# through the map) and the peak anonymous memory (what must fit in RAM), sampled every second.
set -euo pipefail
cd "$(dirname "$0")/.."
vae=${ATARI_VAE:-.venv/bin/atari-vae}
export MLFLOW_DISABLE_TELEMETRY=true
export ATARI_VAE_CACHE_DIR=${CACHE:-$PWD/outputs/three_games/cache}
out=outputs/three_games/${EPISODES:-1000}ep
mkdir -p "$out"
lscpu | grep -E 'Model name|^CPU\(s\)' || true
grep -o -w -E 'avx512_bf16|amx_bf16' /proc/cpuinfo | sort -u || echo "no AVX512-BF16/AMX: fp32"
started=$(date +%s)
/usr/bin/time -v "$vae" train --env_name Breakout,Pong,SpaceInvaders \
  --num_episodes "${EPISODES:-1000}" --epochs 1 --output_dir "$out/run" \
  --experiment_name three-games > "$out/train.log" 2>&1 &
peak=0
while kill -0 $! 2>/dev/null; do
  for pid in $(pgrep -f "atari-vae train --env_name Breakout,Pong,SpaceInvaders" || true); do
    anon=$(awk '/^RssAnon:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    [ "${anon:-0}" -gt "$peak" ] && peak=$anon
  done
  sleep 1
done
wait $! || { tail -20 "$out/train.log"; exit 1; }
grep -E 'INFO|Elapsed|Maximum resident|Exit status' "$out/train.log"
echo "wall $(( $(date +%s) - started )) s; peak anonymous memory $(( peak / 1024 )) MiB;" \
  "frames in $ATARI_VAE_CACHE_DIR: $(du -sh "$ATARI_VAE_CACHE_DIR" | cut -f1)"
