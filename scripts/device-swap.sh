#!/usr/bin/env bash
# Runs on the lent GPU machine through the device tool, in one call (about 5 minutes): the in-place
# weight swap for the 8B Llama shape (runtime/bench/bench_swap.py): a steady decode load, a second
# 8B package swapped in through the store, the pause the clients saw; then the blue-green memory
# split (two engines, half the GPU each) and the swap with fp8 weights, as far as the budget allows.
# The store needs zstandard and cryptography, which that machine's Python lacks: they come from
# the wheels scripts/device-systemd-prepare.sh downloads (carried as .cache/device-systemd/wheels).
#   scripts/device-swap.sh [bench_swap args...]
# Results: $OUT/swap.json and $OUT/swap-log.txt.
set -uo pipefail
out=${OUT:-/tmp/device-out}
mkdir -p "$out"
exec > >(tee -a "$out/swap-log.txt") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
site=$(mktemp -d)
for whl in .cache/device-systemd/wheels/{zstandard,cryptography,cffi,pycparser}-*.whl; do
  [ -f "$whl" ] && python3 -m zipfile -e "$whl" "$site"
done
python3 -c 'import zstandard, cryptography' 2>/dev/null ||
  PYTHONPATH=$site python3 -c 'import zstandard, cryptography' ||
  { echo "FAIL: zstandard/cryptography missing: run scripts/device-systemd-prepare.sh here and carry .cache/device-systemd/wheels"; exit 2; }
df -h /tmp | tail -1
free -g | head -2
cd runtime && PYTHONPATH=$PWD:$site${PYTHONPATH:+:$PYTHONPATH} timeout 350 python3 bench/bench_swap.py --out "$out/swap.json" "$@"
rc=$?
rm -rf /tmp/bench-swap
echo "== done rc=$rc $(date -u +%H:%M:%S)"
exit $rc
