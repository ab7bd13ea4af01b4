#!/usr/bin/env bash
# Runs on the GPU machine through the device tool (see BENCHMARKS.md for the call):
#   - records `nvidia-smi -q -x` (the fixture gpu_assess's XML parser is tested on) and the
#     compute capability nvidia-smi's query form reports,
#   - runs playbooks/preflight.yml (the platform check) against localhost,
#   - runs playbooks/assess.yml against localhost for the 8B bf16, 70B fp8 and 70B bf16 shapes
#     (the last with the quantization left to the assessment, then pinned to none),
#   - has the nvidia_driver role choose NVIDIA's CUDA repository line for this host's release,
#   - runs playbooks/tune.yml in check mode with card-setting tasks skipped by tag.
# Needs ansible-core and the ansible.posix collection there: on PATH, or carried as
# .cache/device-ansible (wheels/ from `pip download ansible-core`, collections/ansible_collections/
# ansible/posix), which is unpacked here for this machine's python3.
set -u
out=${OUT:-/tmp/device-out}
mkdir -p "$out"
cd "$(dirname "$0")/.."
if ! command -v ansible-playbook >/dev/null && [ -d .cache/device-ansible/wheels ]; then
  site=/tmp/device-ansible
  mkdir -p "$site/bin"
  for whl in .cache/device-ansible/wheels/*.whl; do python3 -m zipfile -e "$whl" "$site/lib"; done
  for cli in playbook inventory; do
    printf '#!/bin/sh\nexec python3 -m ansible.cli.%s "$@"\n' "$cli" >"$site/bin/ansible-$cli"
    chmod +x "$site/bin/ansible-$cli"
  done
  export PATH=$site/bin:$PATH PYTHONPATH=$site/lib ANSIBLE_COLLECTIONS_PATH=$PWD/.cache/device-ansible/collections
fi
export ANSIBLE_NOCOLOR=1 ANSIBLE_CONFIG=$PWD/ansible.cfg
nvidia-smi -q -x >"$out/nvidia-smi-q.xml"
{
  echo "pid1: $(ps -p 1 -o comm=)"
  grep -E '^(PRETTY_NAME|VERSION_CODENAME)=' /etc/os-release
  nvidia-smi --query-gpu=name,memory.total,driver_version,pci.bus_id,compute_cap --format=csv
} >"$out/host.txt"

ansible-playbook playbooks/preflight.yml -i inventory/device >"$out/preflight.txt" 2>&1
echo "exit code $?" >>"$out/preflight.txt"

# name params_billion kv_bytes_per_token dtype [extra var]
while read -r name params kv dtype extra; do
  ansible-playbook playbooks/assess.yml -i inventory/device \
    -e assess_params_billion="$params" -e assess_kv_bytes_per_token="$kv" -e assess_dtype="$dtype" \
    -e assess_context_length=4096 -e assess_concurrency=1 ${extra:+-e "$extra"} >"$out/assess-$name.txt" 2>&1
  echo "exit code $?" >>"$out/assess-$name.txt"
done <<'SHAPES'
llama-8b-bf16 8.03 131072 bf16
llama-70b-fp8 70.55 327680 fp8
llama-70b-bf16 70.55 327680 bf16
llama-70b-bf16-pinned 70.55 327680 bf16 inference_runtime_quantization=none
SHAPES

# The CUDA repository line the driver role would add here (nothing is installed: preflight only).
play=$(mktemp --suffix=.yml)
cat >"$play" <<'PLAY'
- name: Choose NVIDIA's CUDA repository line for this host
  hosts: gpu_servers
  tasks:
    - name: Run the driver role's preflight
      ansible.builtin.include_role: {name: nvidia_driver, tasks_from: preflight}
    - name: Show the line
      ansible.builtin.debug: {msg: "{{ ansible_facts.distribution }} {{ ansible_facts.distribution_release }} {{ ansible_facts.architecture }}: {{ _nvidia_driver_apt_repo }}"}
PLAY
touch /tmp/cuda-archive-keyring.asc
ANSIBLE_ROLES_PATH=$PWD/roles ansible-playbook "$play" -i inventory/device \
  -e nvidia_driver_cuda_repo_url=https://developer.download.nvidia.com/compute/cuda/repos \
  -e nvidia_driver_apt_key_src=/tmp/cuda-archive-keyring.asc >"$out/cuda-repo-line.txt" 2>&1
echo "exit code $?" >>"$out/cuda-repo-line.txt"

# Whether this release's archive has the packages the roles install (where apt has lists).
apt-cache policy nginx nginx-light python3-cryptography python3-venv python3-packaging e2fsprogs xfsprogs nvme-cli \
  prometheus prometheus-node-exporter prometheus-alertmanager >"$out/apt-policy.txt" 2>&1

ansible-playbook playbooks/tune.yml -i inventory/device --check --diff --skip-tags gpu_settings >"$out/tune-check.txt" 2>&1
echo "exit code $?" >>"$out/tune-check.txt"
