#!/usr/bin/env bash
# Print what now runs on the demo host and how to reach it.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
host="${1:-inferd-demo}"
ip=$(podman container inspect -f "{{(index .NetworkSettings.Networks \"$TESTHOST_NETWORK\").IPAddress}}" "$host")
cat <<MSG

Demo host '$host' is up at $ip (a podman container with systemd as PID 1).
  shell:        podman exec -it $host bash
  tuning:       podman exec $host sysctl vm.swappiness vm.overcommit_memory
  re-run:       ansible-playbook site.yml -i inventory/demo      (idempotent: changed=0)
  tear down:    make demo-down
MSG
podman exec "$host" sysctl vm.swappiness vm.overcommit_memory | sed 's/^/  now: /'
