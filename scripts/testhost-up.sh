#!/usr/bin/env bash
# Bring up one disposable test host: a podman container with systemd as PID 1 and its own IP on
# the project's test network. Usage: testhost-up.sh NAME   (prints the host's IP on stdout)
# Several hosts on the same network reach each other by name.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

name="${1:-}"
[ -n "$name" ] || die "no host name given." "usage: $0 NAME"
need_cmd podman

"$(dirname "$0")/testhost-image.sh"
image=$(testhost_image)

if [ "$(podman container inspect -f '{{.State.Running}}' "$name" 2>/dev/null)" != "true" ]; then
  podman rm -f "$name" >/dev/null 2>&1 || true
  log "starting test host $name"
  podman run -d --name "$name" --hostname "$name" --network "$TESTHOST_NETWORK" \
    --privileged --systemd=always --label inferd.testhost=1 \
    "$image" /sbin/init >/dev/null ||
    die "podman could not start $name." "run 'make setup' (it writes the podman settings this machine needs), then try again."
fi

# Wait for systemd to finish booting so the first Ansible task meets a settled host.
for _ in $(seq 1 60); do
  state=$(podman exec "$name" systemctl is-system-running 2>/dev/null || true)
  case "$state" in
    running | degraded) break ;;
  esac
  sleep 1
done
case "$state" in
  running | degraded) ;;
  *) die "test host $name did not finish booting (systemd says '$state')." \
         "inspect it with 'podman exec -it $name journalctl -b', then '$(dirname "$0")/testhost-down.sh $name'." ;;
esac
podman container inspect -f "{{(index .NetworkSettings.Networks \"$TESTHOST_NETWORK\").IPAddress}}" "$name"
