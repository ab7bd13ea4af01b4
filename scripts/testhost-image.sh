#!/usr/bin/env bash
# Build (once) the Debian bookworm image the disposable test hosts boot from: systemd as PID 1,
# python3 for Ansible. No registry is reachable, so the root filesystem comes from debootstrap;
# the tarball is cached, keyed by the package list, so a rebuild after `podman rmi` takes seconds.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

need_cmd podman
need_cmd debootstrap
need_cmd zstd

image=$(testhost_image)
if [ "${1:-}" = "--name" ]; then
  printf '%s\n' "$image"
  exit 0
fi
ensure_testhost_network
if podman image exists "$image"; then
  log "test-host image $image is present"
  exit 0
fi

mkdir -p "$CACHE_DIR"
tarball="$CACHE_DIR/testhost-$(testhost_image_tag).tar.zst"

if [ ! -s "$tarball" ]; then
  free_mb=$(df -Pm "$CACHE_DIR" | awk 'NR==2 {print $4}')
  [ "$free_mb" -ge 1500 ] ||
    die "only ${free_mb} MB free under $CACHE_DIR; the image build needs about 1500 MB." \
        "free disk space there, or point INFERD_CACHE_DIR at a larger disk."
  work=$(mktemp -d "$CACHE_DIR/rootfs.XXXXXX")
  # A build that fails half-way leaves nothing under the final tarball or image name.
  trap 'rm -rf "$work" "$tarball.partial"' EXIT
  mirror=$(debian_mirror)
  log "debootstrap bookworm from $mirror (about a minute)"
  if ! debootstrap --variant=minbase --include="$TESTHOST_PACKAGES" bookworm "$work/rootfs" "$mirror" \
      >"$work/debootstrap.log" 2>&1; then
    tail -n 20 "$work/debootstrap.log" >&2
    die "debootstrap failed (log above)." \
        "check that $mirror is reachable ('apt-get update' works) and that there is disk space, then run again."
  fi
  # Each container gets its own machine id on first boot.
  : >"$work/rootfs/etc/machine-id"
  # udev's default link policy derives eth0's MAC from the interface name, so every container
  # got the same MAC and hosts on one network could not reach each other: keep podman's MAC.
  mkdir -p "$work/rootfs/etc/systemd/network"
  ln -sf /dev/null "$work/rootfs/etc/systemd/network/99-default.link"
  # Units that make no sense in a container and slow the boot down.
  for unit in systemd-networkd-wait-online.service getty@tty1.service; do
    ln -sf /dev/null "$work/rootfs/etc/systemd/system/$unit"
  done
  tar -C "$work/rootfs" --numeric-owner -cf - . | zstd -q -T0 -o "$tarball.partial"
  mv "$tarball.partial" "$tarball"
  rm -rf "$work"
  trap - EXIT
fi

log "importing $tarball as $image"
tmp_tag="$TESTHOST_IMAGE_NAME:partial-$$"
trap 'podman rmi -f "$tmp_tag" >/dev/null 2>&1 || true' EXIT
zstd -dc "$tarball" | podman import \
  --change 'CMD ["/sbin/init"]' \
  --change 'STOPSIGNAL SIGRTMIN+3' \
  --change 'ENV container=podman' \
  - "$tmp_tag" >/dev/null ||
  die "podman import failed." "remove $tarball to rebuild it from scratch, then run again."
podman tag "$tmp_tag" "$image"
podman rmi "$tmp_tag" >/dev/null
trap - EXIT
log "test-host image $image is ready"
