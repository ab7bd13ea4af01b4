#!/usr/bin/env bash
# Runs on the lent GPU machine through the device tool (one call, about 8 minutes): the DeepSeek
# kernels' GPU tests against their references (and the tiny V2/V3 models on CUDA against the CPU
# reference), then runtime/bench/bench_deepseek.py (the latent decode kernel, a full-width V3 fp8
# slice, V2-Lite through our engine and HF generate).
#   scripts/device-deepseek.sh [bench_deepseek args...]
# Results: $OUT/deepseek.json, $OUT/deepseek-tests.txt and $OUT/deepseek-log.txt.
set -uo pipefail
out=${OUT:-/tmp/device-out}
mkdir -p "$out"
exec > >(tee -a "$out/deepseek-log.txt") 2>&1
cd "$(dirname "$0")/../runtime" || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
echo "== tests $(date -u +%H:%M:%S)"
PYTHONPATH=$PWD python3 -m pytest -q -p no:cacheprovider tests/test_cuda_deepseek.py 2>&1 | tail -40 > "$out/deepseek-tests.txt"
tests=${PIPESTATUS[0]}
cat "$out/deepseek-tests.txt"
echo "== bench $(date -u +%H:%M:%S)"
PYTHONPATH=$PWD python3 bench/bench_deepseek.py --out "$out/deepseek.json" "$@"
bench=$?
echo "== done $(date -u +%H:%M:%S): tests rc $tests, bench rc $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
