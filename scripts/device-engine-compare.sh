#!/usr/bin/env bash
# Runs on the lent GPU machine through the device tool: the engine benchmark on two copies of the
# runtime in one run (a refactor's "before" and "after", same card, same minutes), so a change
# that should not move speed is checked within the run's own noise. Each tree runs its own
# bench/bench_engine.py. Peers (HF generate) run once, with the NEW tree, for the roofline context.
#   scripts/device-engine-compare.sh OLD_RUNTIME_DIR NEW_RUNTIME_DIR [bench_engine args...]
# Results: $OUT/compare-{old,new}.json and $OUT/compare-log.txt.
set -uo pipefail
old=$1 new=$2
shift 2
out=${OUT:-/tmp/device-out}
mkdir -p "$out"
exec > >(tee -a "$out/compare-log.txt") 2>&1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for tree in new old; do
  dir=$old
  peers=(--skip-peers)
  if [ "$tree" = new ]; then dir=$new peers=(); fi
  echo "== $tree: $dir $(date -u +%H:%M:%S)"
  (cd "$dir" && PYTHONPATH=$PWD python3 bench/bench_engine.py "${peers[@]}" "$@" --out "$out/compare-$tree.json") || echo "FAIL: $tree exited $?"
done
echo "== done $(date -u +%H:%M:%S)"
