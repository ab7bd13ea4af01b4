#!/usr/bin/env bash
# verify-bundle.sh DIR SHA256: the bundle's manifest hashes to SHA256 (pinned in the inventory),
# every file it lists matches, and no file it does not list is present (pip would pick up a wheel
# dropped into the wheelhouse). Exit 0 and print "bundle verified" only then.
set -euo pipefail
dir="${1:?usage: $0 DIR SHA256}" want="${2:?usage: $0 DIR SHA256}"
fail() { printf 'offline bundle %s: %s\n  fix: %s\n' "$dir" "$1" "$2" >&2; exit 1; }
[ -f "$dir/MANIFEST.sha256" ] || fail "has no MANIFEST.sha256" "build it with 'make bundle' (scripts/bundle.sh) and copy the whole directory."
have=$(sha256sum <"$dir/MANIFEST.sha256" | cut -d' ' -f1)
[ "$have" = "$want" ] ||
  fail "its manifest hashes to $have, not to the pinned offline_bundle_manifest_sha256 $want" \
    "use the bundle recorded with this change, or pin the digest bundle.sh printed for the new one."
cd "$dir"
bad=$(sha256sum --check --strict --quiet MANIFEST.sha256 2>&1) ||
  fail "files do not match the manifest: $(printf '%s' "$bad" | head -n 5 | tr '\n' ';')" \
    "rebuild or re-copy the bundle; do not edit files in it."
extra=$(comm -23 <(find . -type f ! -name MANIFEST.sha256 -printf '%P\n' | LC_ALL=C sort) \
  <(sed 's/^[0-9a-f]\{64\}  //' MANIFEST.sha256 | LC_ALL=C sort))
[ -z "$extra" ] || fail "holds files the manifest does not list: $(printf '%s' "$extra" | head -n 5 | tr '\n' ' ')" \
  "remove them, or rebuild the bundle with them."
echo "bundle verified"
