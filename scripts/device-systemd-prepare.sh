#!/usr/bin/env bash
# Build, on this machine, what scripts/device-systemd-check.sh needs on the lent GPU machine
# (Ubuntu 24.04, no systemd, no network), under .cache/device-systemd (carried by the device tool):
#   debs/      Debian bookworm's systemd, and the libraries it links that the machine's image
#              lacks (libkmod2, libip4tc2, libapparmor1): booted there as PID 1 in its own namespaces
#   wheels/    the runtime wheel and the dependencies that machine's Python 3.12 lacks
#              (its CUDA torch is used through a --system-site-packages virtualenv)
#   rendered/  the inference_runtime role's unit, config and hashed keys, rendered by Ansible from
#              the role's own templates with the bank inventory's GPU settings
#   api-key, metrics-token   the plain user key and Prometheus token the check sends (hashed in rendered/)
# Usage: scripts/device-systemd-prepare.sh     (then the device call in BENCHMARKS.md)
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$PROJECT_ROOT"
out=.cache/device-systemd
venv="${VENV:-$PROJECT_ROOT/.venv}"
[ -x "$venv/bin/ansible-playbook" ] || die "no virtualenv at $venv." "run 'make setup' first."
rm -rf "$out.partial" && mkdir -p "$out.partial"/{debs,wheels}

log "downloading Debian's systemd packages"
(cd "$out.partial/debs" && apt-get download -q systemd libsystemd-shared libkmod2 libip4tc2 libapparmor1 >/dev/null) ||
  die "apt-get download failed." "run 'apt-get update', then again."

log "building the runtime wheel and downloading its missing dependencies for Python 3.12"
"$venv/bin/pip" wheel -q --no-deps -w "$out.partial/wheels" ./runtime
"$venv/bin/pip" download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  -d "$out.partial/wheels" fastapi==0.163.2 uvicorn==0.54.0 rocksdict==0.3.29 zstandard==0.25.0 \
  'cryptography>=44' prometheus-client==0.26.0 nvidia-ml-py==13.615.71

log "rendering the inference_runtime role's unit and configuration (bank GPU settings)"
api_key="sk-inferd-$(openssl rand -hex 32)"
metrics_token=$(openssl rand -hex 32)
(umask 077 && printf '%s' "$api_key" >"$out.partial/api-key" && printf '%s' "$metrics_token" >"$out.partial/metrics-token")
(umask 077 && cat >"$out.partial/settings.yml" <<YML
inference_runtime_device: cuda
inference_runtime_nvidia_devices: [/dev/nvidia0]
inference_runtime_served_model_name: deepseek-device
# Served encrypted, the key as the systemd credential model-key (the bank's setting); the key itself
# is made on the device, only its presence shapes the unit.
inference_runtime_model_key: made-on-the-device
# The signer's key is made there too; only its presence shapes the config (model_public_key_file).
inference_runtime_model_public_key: made-on-the-device
inference_runtime_max_model_len: 2048
inference_runtime_api_keys: [{name: device-user, role: user, key: "$api_key"}]
inference_runtime_metrics_token: "$metrics_token"
YML
)
"$venv/bin/ansible-playbook" scripts/render-runtime-unit.yml -e "render_out=$PWD/$out.partial/rendered" \
  -e "@$out.partial/settings.yml" >/dev/null
rm "$out.partial/settings.yml"
rm -rf "$out" && mv "$out.partial" "$out"
log "ready: $out ($(du -sh "$out" | cut -f1)); carry it to the device (BENCHMARKS.md)"
