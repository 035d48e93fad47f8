#!/usr/bin/env bash
# Installs what the driver's tests and tools need on Debian 12 (as root), idempotently:
# Debian packages (a real dockerd, a registry, busybox for tiny images, debootstrap for
# the Molecule worker-node image) and a Python virtualenv at .venv with the driver
# installed editable plus the test tools and the Ansible tooling (requirements-ansible.txt).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(docker.io docker-registry busybox-static python3-venv attr tar debootstrap xfsprogs
  containerd runc)  # xfsprogs: the disk-full faults on xfs; the last two: private containerds

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "setup: missing Debian packages ${missing[*]}; run as root (apt-get install)" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's docker.io starts its own dockerd under systemd; the tests start private ones
# and need nothing else running. No systemd here: nothing to stop.

if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
.venv/bin/python -m pip install -q --disable-pip-version-check -e 'driver[test,bench,publisher]'
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-ansible.txt

# CernVM-FS: a real client and stratum 0 for the thin-image and lazy-pull tests, from
# where scripts/cvmfs.sh decides (CERN's repository, ../shared/cvmfs, or loudly none).
bash scripts/cvmfs.sh install all
