#!/usr/bin/env bash
# Tear down disposable test hosts. Usage: testhost-down.sh NAME [NAME...]   or   --all
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
need_cmd podman
[ $# -gt 0 ] || die "no host name given." "usage: $0 NAME [NAME...] | --all"
if [ "$1" = "--all" ]; then
  mapfile -t hosts < <(podman ps -a --filter label=inferd.testhost=1 --format '{{.Names}}')
else
  hosts=("$@")
fi
for host in "${hosts[@]}"; do
  [ -n "$host" ] || continue
  log "removing test host $host"
  podman rm -f -t 5 "$host" >/dev/null 2>&1 || true
done
