#!/usr/bin/env bash
# Runs on the lent 2×H200 machine (kind nvidia-h200-x2) through the device tool, in one call
# (at most 9 minutes: each step has its own timeout): tensor parallelism against one GPU, random weights made on each GPU.
#   1. the TP=2 NCCL tests (runtime/tests/test_cuda_tp.py);
#   2. 8B shape: TP1 bf16 (+ HF generate on one GPU), TP2 bf16;
#   3. 70B shape: TP2 bf16, and fp8 weights on one GPU;
# each at batch 1 (ms/token against the per-GPU roofline) and 64 × 512 in / 256 out.
# Results: $OUT/tp-*.json, $OUT/tp-log.txt. Each configuration is its own process (a failure is
# reported and the next one runs).
set -uo pipefail
out=${OUT:-/tmp/device-out}
mkdir -p "$out"
exec > >(tee -a "$out/tp-log.txt") 2>&1
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/runtime${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
nvidia-smi topo -m || true
run() { # name, timeout seconds, args...
  local name=$1 limit=$2
  shift 2
  echo "== $name $(date -u +%H:%M:%S)"
  timeout "$limit" python3 runtime/bench/bench_tp.py "$@" --out "$out/tp-$name.json" || echo "FAIL: $name exited $?"
}
echo "== tests $(date -u +%H:%M:%S)"
timeout 150 python3 -m pytest -q -p no:cacheprovider runtime/tests/test_cuda_tp.py || echo "FAIL: tests exited $?"
run 8b-tp1 140 --shape llama-8b --tensor-parallel-size 1 --hf
run 8b-tp2 90 --shape llama-8b --tensor-parallel-size 2
run 70b-tp2 110 --shape llama-70b --tensor-parallel-size 2
run 70b-fp8-tp1 110 --shape llama-70b --tensor-parallel-size 1 --quantization fp8
echo "== done $(date -u +%H:%M:%S)"
