#!/usr/bin/env bash
# Runs on the lent GPU machine through the device tool: speculative decoding's CUDA tests, then
# its benchmark (one H200: plain vs prompt lookup vs draft model, 7B shape drafted by the 1.5B
# shape, random weights; natural and forced-acceptance runs). Results: $OUT/spec.json,
# $OUT/spec-tests.txt and $OUT/spec-log.txt.
set -uo pipefail
out=${OUT:-/tmp/device-out}
mkdir -p "$out"
exec > >(tee -a "$out/spec-log.txt") 2>&1
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
export PYTHONPATH=$PWD/runtime${PYTHONPATH:+:$PYTHONPATH}
echo "== tests $(date -u +%H:%M:%S)"
timeout 300 python3 -m pytest -q -p no:cacheprovider -rs runtime/tests/test_cuda_speculative.py 2>&1 | tail -40 | tee "$out/spec-tests.txt"
echo "== bench $(date -u +%H:%M:%S)"
timeout 280 python3 runtime/bench/bench_spec.py --out "$out/spec.json" "$@" || echo "FAIL: bench_spec exited $?"
echo "== done $(date -u +%H:%M:%S)"
