#!/usr/bin/env bash
# Run every molecule scenario under molecule/ (or those named): create, converge, idempotence,
# verify, destroy. The test-host image and network must exist (make setup).
set -euo pipefail
cd "$(dirname "$0")/.."
INFERD_TESTHOST_IMAGE=$(scripts/testhost-image.sh --name)
export INFERD_TESTHOST_IMAGE
scripts/testhost-image.sh >/dev/null
# The offline bundle the site scenario deploys from (wheelhouse, .debs, the demo model and keys).
scripts/bundle.sh .cache/bundle >/dev/null
# The site scenario's air-gapped network: --internal gives its hosts no route out and no DNS.
# Created here, not by molecule, whose podman driver makes networks with a route out.
podman network exists inferd-airgap ||
  podman network create --internal --subnet 10.89.250.0/24 inferd-airgap >/dev/null 2>&1
[ "$(podman network inspect -f '{{.Internal}}' inferd-airgap)" = true ] ||
  { echo "error: podman network inferd-airgap exists but is not --internal; remove it: podman network rm inferd-airgap" >&2; exit 1; }
if [ $# -gt 0 ]; then scenarios=("$@"); else
  mapfile -t scenarios < <(find molecule -mindepth 2 -maxdepth 2 -name molecule.yml -printf '%h\n' | xargs -n1 basename | sort)
fi
[ ${#scenarios[@]} -gt 0 ] || { echo "error: no molecule scenarios found under molecule/" >&2; exit 1; }
for s in "${scenarios[@]}"; do
  start=$(date +%s)
  molecule test -s "$s" || status=$?
  # Loop devices belong to the shared kernel: detach any a failed scenario left behind.
  losetup --list --noheadings --output NAME,BACK-FILE 2>/dev/null |
    awk '$2 ~ /^\/var\/tmp\/(model|foreign|data)\.img/ {print $1}' | xargs -r -n1 losetup --detach || true
  [ "${status:-0}" -eq 0 ] || exit "$status"
  echo "molecule scenario $s: $(( $(date +%s) - start ))s"
done
