#!/usr/bin/env bash
# Runs on the lent GPU machine through the device tool (one call, about 8 minutes): the DeepSeek
# GPU tests (the kernels against their references, the tiny V2/V3 models on CUDA against the CPU),
# then runtime/bench/bench_deepseek.py (the latent decode kernel, a full-width V3 fp8 slice,
# V2-Lite through our engine beside HF generate). DEEPSEEK_TESTS=0 skips the tests.
#   scripts/device-deepseek.sh [bench_deepseek args...]
# The engine imports zstandard (absent there): carry its wheel and put it on PYTHONPATH, as for
# device-engine-compare.sh; it is kept.
# Results: $OUT/deepseek.json (written after each part), $OUT/deepseek-tests.txt, $OUT/deepseek-log.txt.
set -uo pipefail
out=${OUT:-/tmp/device-out}
mkdir -p "$out"
exec > >(tee -a "$out/deepseek-log.txt") 2>&1
cd "$(dirname "$0")/../runtime" || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
tests=0
if [ "${DEEPSEEK_TESTS:-1}" != 0 ]; then
  echo "== tests $(date -u +%H:%M:%S)"
  PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} timeout 180 python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda_deepseek.py > "$out/deepseek-tests.txt" 2>&1
  tests=$?
  tail -40 "$out/deepseek-tests.txt"
fi
echo "== bench $(date -u +%H:%M:%S)"
PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} python3 bench/bench_deepseek.py --out "$out/deepseek.json" "$@"
bench=$?
echo "== done $(date -u +%H:%M:%S): tests rc $tests, bench rc $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
