#!/usr/bin/env bash
# One idempotent step that installs everything the project needs on a fresh Debian machine:
# system packages, podman settings, the pinned virtualenv (toolchain + runtime) and the test-host
# image. Each part is skipped when its stamp matches, so a second run takes seconds.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$PROJECT_ROOT"

VENV="${VENV:-$PROJECT_ROOT/.venv}"
STAMPS="$VENV/.stamps"
# golang-github-containernetworking-plugin-dnsname: podman 4.3 on bookworm uses CNI, where test
# hosts resolve each other by name only through this plugin.
APT_PACKAGES=(debootstrap podman runc zstd uidmap slirp4netns fuse-overlayfs iproute2 e2fsprogs
  golang-github-containernetworking-plugin-dnsname
  nginx-light prometheus prometheus-node-exporter prometheus-alertmanager openssl
  dpkg-dev gnupg)  # the offline bundle's apt repository (scripts/bundle.sh)

[ "$(id -u)" -eq 0 ] || die "setup needs root (apt-get, podman with systemd containers)." "run it as root."
command -v apt-get >/dev/null || die "this setup supports Debian/Ubuntu machines only." "use a Debian bookworm machine."

stamp_ok() { [ -f "$STAMPS/$1" ] && [ "$(cat "$STAMPS/$1")" = "$2" ]; }
stamp_set() { mkdir -p "$STAMPS"; printf '%s' "$2" >"$STAMPS/$1"; }

# 1. System packages.
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing system packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The Debian packages start daemons we do not want on the controller; tests start their own.
  for svc in prometheus prometheus-node-exporter prometheus-alertmanager nginx; do
    systemctl disable --now "$svc" >/dev/null 2>&1 || true
  done
fi

# 2. Podman settings this kind of VM needs (crun refuses its hybrid cgroups; rlimits must not
#    exceed the host's hard limits).
conf_dir=/etc/containers/containers.conf.d
conf="$conf_dir/50-inferd-testhosts.conf"
# Capped as well: on this VM runc failed to set nproc above 32768 even under the hard limit.
nofile=$(ulimit -Hn); nproc=$(ulimit -Hu)
[ "$nofile" = unlimited ] || [ "$nofile" -gt 20000 ] && nofile=20000
[ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ] && nproc=32768
want=$(cat <<CONF
# Written by inferd scripts/setup.sh for the disposable test hosts.
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
)
if [ "$(cat "$conf" 2>/dev/null)" != "$want" ]; then
  log "writing $conf"
  mkdir -p "$conf_dir"
  printf '%s\n' "$want" >"$conf"
fi


# 3. The virtualenv: pinned toolchain, then the runtime (editable) with the CPU torch wheel
#    that lies on this machine's disk.
py_key=$(cat requirements-dev.txt runtime/pyproject.toml | sha256sum | cut -c1-16)
if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtualenv $VENV"
  python3 -m venv "$VENV"
fi
if ! stamp_ok python "$py_key"; then
  log "installing Python dependencies (first time: a few minutes)"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q -r requirements-dev.txt -e 'runtime[dev]'
  stamp_set python "$py_key"
fi

# 4. The test-host image.
"$PROJECT_ROOT/scripts/testhost-image.sh"
log "setup complete"
