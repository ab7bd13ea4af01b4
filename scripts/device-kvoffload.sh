#!/usr/bin/env bash
# Runs on the lent GPU machine (one H200) through the device tool, one part per call:
#   scripts/device-kvoffload.sh test      # the host KV tier on CUDA (pinned pool, side stream, fp8 KV): seconds
#   scripts/device-kvoffload.sh heavy     # runtime/bench/bench_heavy.py: about 3 minutes -> $OUT/heavy.json
#   scripts/device-kvoffload.sh startup   # runtime/bench/bench_startup.py: about 3.5 minutes -> $OUT/startup.json
# Extra arguments go to the bench. Logs: $OUT/<part>-log.txt. Nothing needs carrying: the engine
# path these use imports neither the server nor the model store's crypto.
set -uo pipefail
part=${1:?usage: scripts/device-kvoffload.sh test|heavy|startup [args...]}
shift
out=${OUT:-/tmp/device-out}
mkdir -p "$out"
exec > >(tee -a "$out/$part-log.txt") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
free -g | head -2
df -h /tmp | tail -1
case $part in
  test) PYTHONPATH=$PWD/runtime timeout 300 python3 -m pytest -q -p no:cacheprovider runtime/tests/test_cuda_host_cache.py ;;
  heavy) cd runtime && timeout 330 python3 bench/bench_heavy.py --out "$out/heavy.json" "$@" ;;
  startup) cd runtime && timeout 330 python3 bench/bench_startup.py --out "$out/startup.json" "$@" ;;
  *) echo "unknown part $part: test, heavy or startup"; exit 2 ;;
esac
rc=$?
echo "== done rc=$rc $(date -u +%H:%M:%S)"
exit $rc
