#!/usr/bin/env bash
# Wheels for benchmarks/gpu.sh on a GPU machine without a package index: everything atari-vae
# needs beyond torch, for that machine's Python, minus what its image already holds.
#
#   bash benchmarks/gpu_wheels.sh .whl 3.12       # then, there:
#   pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#
# PRESENT lists the packages the image has (default: the H200 image of the device tool,
# as read on 2026-11-17); each is left out, so the image's torch, numpy and scipy stay in charge.
set -euo pipefail
dir=${1:-.whl} py=${2:-3.12}
PRESENT=${PRESENT:-"aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi
charset-normalizer click cloudpickle contourpy cycler filelock fonttools frozenlist fsspec h11
idna jinja2 joblib kiwisolver markupsafe matplotlib multidict narwhals numpy packaging pandas
pillow propcache protobuf psutil pyarrow pyparsing python-dateutil pyyaml requests safetensors
scikit-learn scipy six threadpoolctl tqdm typing-extensions urllib3 werkzeug yarl zipp"}
all=$(mktemp -d)
platforms=()
for tag in manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 manylinux_2_31 \
    manylinux_2_34 manylinux_2_35 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
python3 -m pip download -q --only-binary=:all: --python-version "$py" --implementation cp \
  "${platforms[@]}" -d "$all" "mlflow>=3.1,<4" "gymnasium>=1.0,<2" "ale-py>=0.10,<0.13" \
  "optuna>=5.0,<6" "optuna-integration>=4.0,<6" "cma>=3.3" safetensors filelock starlette uvicorn
mkdir -p "$dir"
for wheel in "$all"/*.whl; do
  name=$(basename "$wheel" | cut -d- -f1 | tr 'A-Z_' 'a-z-')
  grep -qw -- "$name" <<<" $PRESENT " || cp "$wheel" "$dir/"
done
rm -r "$all"
echo "$(ls "$dir" | wc -l) wheels, $(du -sh "$dir" | cut -f1), in $dir"
