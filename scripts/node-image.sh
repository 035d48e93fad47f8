#!/usr/bin/env bash
# Builds a Debian systemd "worker node" image for Molecule and the demo, without any
# registry: debootstrap a minimal Debian with systemd and Python, cache the root file
# system as a tarball under .cache/node-image/, and import it into the dockerd at
# $DOCKER_HOST (scripts/molecule-dockerd.sh). Reruns reuse the tarball and the image.
#
#   bash scripts/node-image.sh            # Debian 12; prints the image name when done
#   NODE_SUITE=trixie bash scripts/node-image.sh      # Debian 13 (docker.io 26, containerd 1.7)
#
# NODE_SUITE: bookworm (default) or trixie. NODE_IMAGE (default
# cvmfs-graphdriver/node:debian12 or :debian13) names the image; DEBIAN_MIRROR (default
# http://deb.debian.org/debian) is where debootstrap and the node fetch packages.
set -euo pipefail
cd "$(dirname "$0")/.."

SUITE=${NODE_SUITE:-bookworm}
case $SUITE in
  bookworm) release=12 ;;
  trixie) release=13 ;;
  *) echo "node-image: NODE_SUITE must be bookworm or trixie, not $SUITE" >&2; exit 2 ;;
esac
IMAGE=${NODE_IMAGE:-cvmfs-graphdriver/node:debian$release}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=.cache/node-image
# Bump when the package list or the set-up below changes: rebuilds the tarball.
RECIPE=7
PACKAGES=systemd,systemd-sysv,dbus,python3,python3-apt,sudo,procps,ca-certificates,iproute2
TARBALL=$CACHE/debian$release-systemd-r$RECIPE.tar

: "${DOCKER_HOST:?set DOCKER_HOST (eval \"\$(bash scripts/molecule-dockerd.sh env)\")}"

if docker image inspect "$IMAGE" --format '{{index .Config.Labels "recipe"}}' 2>/dev/null \
    | grep -qx "$RECIPE"; then
  echo "$IMAGE"
  exit 0
fi

if [[ ! -s $TARBALL ]]; then
  command -v debootstrap >/dev/null || { echo "node-image: debootstrap missing (scripts/setup.sh installs it)" >&2; exit 1; }
  mkdir -p "$CACHE"
  rootfs=$(mktemp -d /var/tmp/node-rootfs.XXXXXX)
  trap 'rm -rf "$rootfs"' EXIT
  echo "node-image: debootstrap $SUITE into $rootfs (about a minute)" >&2
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" \
    >"$CACHE/debootstrap.log" 2>&1 || { tail -n 30 "$CACHE/debootstrap.log" >&2; exit 1; }
  cat >"$rootfs/etc/apt/sources.list" <<SOURCES
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
SOURCES
  # A container has no consoles, no udev and no kernel to tune: keep systemd from trying.
  for unit in getty@tty1.service console-getty.service systemd-udevd.service \
      systemd-udev-trigger.service systemd-sysctl.service systemd-modules-load.service \
      systemd-remount-fs.service sys-kernel-config.mount sys-kernel-debug.mount \
      sys-kernel-tracing.mount; do
    ln -sf /dev/null "$rootfs/etc/systemd/system/$unit"
  done
  : >"$rootfs/etc/machine-id"
  echo node >"$rootfs/etc/hostname"
  rm -f "$rootfs"/var/cache/apt/archives/*.deb
  # Keep debootstrap's package lists (check mode resolves package names from them, as on
  # an installed machine) but make them look old, so the roles' apt cache_valid_time
  # refreshes them before installing anything.
  touch -d @0 "$rootfs"/var/lib/apt/lists
  tar --numeric-owner --xattrs -C "$rootfs" -cf "$TARBALL.tmp" .
  mv "$TARBALL.tmp" "$TARBALL"
fi

echo "node-image: importing $TARBALL as $IMAGE" >&2
docker import "$TARBALL" "$IMAGE-rootfs" >/dev/null
# systemd as PID 1 stops cleanly on SIGRTMIN+3 (SIGTERM makes it re-execute itself).
docker build -q -t "$IMAGE" - >/dev/null <<DOCKERFILE
FROM $IMAGE-rootfs
ENV container=docker
STOPSIGNAL SIGRTMIN+3
LABEL recipe=$RECIPE
CMD ["/lib/systemd/systemd"]
DOCKERFILE
docker rmi "$IMAGE-rootfs" >/dev/null
docker image prune -f >/dev/null   # the previous recipe's image, now untagged
echo "$IMAGE"
