#!/usr/bin/env bash
# Runs on the lent GPU machine through the device tool (one call, at most about 7 minutes): the
# latent MLA decode kernels' GPU tests (runtime/tests/test_cuda_mla.py, and the latent cases of
# test_cuda_deepseek.py, which now reach the wide kernel at 128 heads), then
# runtime/bench/bench_mla.py (narrow against wide, the wide launch sweep, the winning table).
# Needs nothing carried: the bench and tests import torch and triton only (and the tests' conftest).
#   scripts/device-mla.sh [bench_mla args...]
# Results: $OUT/mla.json (written after each case), $OUT/mla-tests.txt, $OUT/mla-log.txt.
set -uo pipefail
out=${OUT:-/tmp/device-out}
mkdir -p "$out"
exec > >(tee -a "$out/mla-log.txt") 2>&1
cd "$(dirname "$0")/../runtime" || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
echo "== tests $(date -u +%H:%M:%S)"
PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} timeout 150 python3 -m pytest -q -p no:cacheprovider -rs \
  tests/test_cuda_mla.py tests/test_cuda_deepseek.py -k "mla" > "$out/mla-tests.txt" 2>&1
tests=$?
tail -30 "$out/mla-tests.txt"
echo "== bench $(date -u +%H:%M:%S)"
PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} timeout 270 python3 bench/bench_mla.py --out "$out/mla.json" "$@"
bench=$?
echo "== done $(date -u +%H:%M:%S): tests rc $tests, bench rc $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
