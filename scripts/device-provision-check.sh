#!/usr/bin/env bash
# Runs on the GPU machine through the device tool (see BENCHMARKS.md for the call):
#   - records `nvidia-smi -q -x` (the fixture gpu_assess's XML parser is tested on),
#   - runs playbooks/assess.yml against localhost for the 8B, 70B-INT8 and 70B-bf16 shapes,
#   - runs playbooks/tune.yml in check mode with card-setting tasks skipped by tag.
# Needs ansible-core and the ansible.posix collection there (carried: see BENCHMARKS.md).
set -u
out=${OUT:-/tmp/device-out}
mkdir -p "$out"
cd "$(dirname "$0")/.."
nvidia-smi -q -x >"$out/nvidia-smi-q.xml"
{ echo "pid1: $(ps -p 1 -o comm=)"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; } >"$out/host.txt"

# name params_billion kv_bytes_per_token dtype
while read -r name params kv dtype; do
  ansible-playbook playbooks/assess.yml -i inventory/device \
    -e assess_params_billion="$params" -e assess_kv_bytes_per_token="$kv" -e assess_dtype="$dtype" \
    -e assess_context_length=4096 -e assess_concurrency=1 >"$out/assess-$name.txt" 2>&1
  echo "exit code $?" >>"$out/assess-$name.txt"
done <<'SHAPES'
llama-8b-bf16 8.03 131072 bf16
llama-70b-int8 70.55 327680 int8
llama-70b-bf16 70.55 327680 bf16
SHAPES

ansible-playbook playbooks/tune.yml -i inventory/device --check --diff --skip-tags gpu_settings >"$out/tune-check.txt" 2>&1
echo "exit code $?" >>"$out/tune-check.txt"
