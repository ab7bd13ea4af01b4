#!/usr/bin/env bash
# Runs on the lent GPU machine through the device tool, in one call of at most 8 minutes (about 4):
# the DeepSeek GPU tests (tests/test_cuda_deepseek.py: the kernels against their references, the
# fp8 MoE at 1/13/64 tokens, the tiny V2/V3 models on CUDA against the CPU, `quantization: fp8`
# against bf16), then runtime/bench/bench_deepseek.py: the MoE dispatch comparison (Triton grouped
# GEMM vs torch._grouped_mm at 1-512 tokens, and whether the default picked the faster), the
# V2-Lite shape through our engine beside HF generate at batch 1, 16 and 64 x 512/256, the V3 fp8
# slice and the latent kernel. DEEPSEEK_TESTS=0 skips the tests; arguments go to the bench.
#   scripts/device-deepseek.sh [bench_deepseek args...]
# The engine imports zstandard, which that machine's Python lacks: it comes from the wheel
# scripts/device-systemd-prepare.sh downloads (carry .cache/device-systemd/wheels).
# Results: $OUT/deepseek.json (written after each bench part), $OUT/deepseek-tests.txt,
# $OUT/deepseek-log.txt.
set -uo pipefail
out=${OUT:-/tmp/device-out}
mkdir -p "$out"
exec > >(tee -a "$out/deepseek-log.txt") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
site=$(mktemp -d)
for whl in .cache/device-systemd/wheels/zstandard-*.whl; do
  [ -f "$whl" ] && python3 -m zipfile -e "$whl" "$site"
done
python3 -c 'import zstandard' 2>/dev/null || PYTHONPATH=$site python3 -c 'import zstandard' ||
  { echo "FAIL: zstandard missing: run scripts/device-systemd-prepare.sh here and carry .cache/device-systemd/wheels"; exit 2; }
cd runtime || exit 1
export PYTHONPATH=$PWD:$site${PYTHONPATH:+:$PYTHONPATH}
tests=0
if [ "${DEEPSEEK_TESTS:-1}" != 0 ]; then
  echo "== tests $(date -u +%H:%M:%S)"
  timeout 240 python3 -m pytest -q -p no:cacheprovider -rs -s tests/test_cuda_deepseek.py > "$out/deepseek-tests.txt" 2>&1
  tests=$?
  grep -E "^(fp8 vs bf16|cosine)" "$out/deepseek-tests.txt"
  tail -25 "$out/deepseek-tests.txt"
fi
echo "== bench $(date -u +%H:%M:%S)"
# HF generate's 64 new tokens (its first call) keep the V2-Lite part near 80 s (BENCHMARKS.md)
timeout 200 python3 bench/bench_deepseek.py --parts moe lite v3 kernel --peer-output-len 64 --out "$out/deepseek.json" "$@"
bench=$?
echo "== done $(date -u +%H:%M:%S): tests rc $tests, bench rc $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
