#!/usr/bin/env bash
# Run a command as it would run on an AVX2-only CPU (most laptops, many cloud VMs) of this
# machine's make: oneDNN, MKL and ATen's own kernels are capped at AVX2, so precision auto
# trains in fp32. The clocks and caches stay this CPU's, so it measures the code paths an
# AVX2 machine takes, not that machine.
#   bash benchmarks/as_avx2.sh .venv/bin/python benchmarks/bench.py --only machine,peak,train
set -euo pipefail
export ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2
exec "$@"
