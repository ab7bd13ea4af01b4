# Shared helpers for the project's shell scripts. Source it; do not run it.
# shellcheck shell=bash

TESTHOST_IMAGE_NAME="${TESTHOST_IMAGE_NAME:-localhost/inferd-testhost}"
TESTHOST_NETWORK="${TESTHOST_NETWORK:-inferd-test}"
PROJECT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE_DIR="${INFERD_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/inferd}"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# die MESSAGE FIX: the problem, then what to do about it.
die() {
  printf 'error: %s\n' "$1" >&2
  [ -n "${2:-}" ] && printf '  fix: %s\n' "$2" >&2
  exit 1
}

need_cmd() {
  command -v "$1" >/dev/null 2>&1 ||
    die "'$1' is not installed." "run 'make setup' (or: apt-get install -y ${2:-$1})."
}

# The packages baked into the test-host image; the image tag is derived from this list,
# so changing it builds a new image instead of silently reusing the old one.
TESTHOST_PACKAGES="systemd,systemd-sysv,dbus,python3,python3-apt,sudo,openssh-server,iproute2,iputils-ping,procps,ca-certificates,gnupg,curl,less,kmod,udev,e2fsprogs,util-linux,cron"

testhost_image_tag() {
  printf '%s bookworm minbase v2' "$TESTHOST_PACKAGES" | sha256sum | cut -c1-12
}

testhost_image() { printf '%s:%s' "$TESTHOST_IMAGE_NAME" "$(testhost_image_tag)"; }

# debootstrap must use the same mirror the machine itself uses (no other network is reachable).
debian_mirror() {
  local uri=""
  if compgen -G '/etc/apt/sources.list.d/*.sources' >/dev/null; then
    uri=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/*.sources)
  fi
  if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
    uri=$(awk '$1 == "deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list)
  fi
  printf '%s' "${uri:-http://deb.debian.org/debian}"
}

# The test network, with name resolution between hosts. A network created before the dnsname
# plugin was installed never gains DNS, so such a network (and the disposable hosts on it) is
# replaced rather than kept.
ensure_testhost_network() {
  if podman network exists "$TESTHOST_NETWORK"; then
    [ "$(podman network inspect -f '{{.DNSEnabled}}' "$TESTHOST_NETWORK")" = true ] && return 0
    log "test network $TESTHOST_NETWORK has no DNS (created before the dnsname plugin): recreating it"
    podman ps -aq --filter "network=$TESTHOST_NETWORK" | xargs -r podman rm -f >/dev/null
    podman network rm "$TESTHOST_NETWORK" >/dev/null
  fi
  podman network create "$TESTHOST_NETWORK" >/dev/null
  [ "$(podman network inspect -f '{{.DNSEnabled}}' "$TESTHOST_NETWORK")" = true ] ||
    die "podman created $TESTHOST_NETWORK without DNS, so test hosts cannot reach each other by name." \
        "run 'make setup' (it installs golang-github-containernetworking-plugin-dnsname), then again."
}
