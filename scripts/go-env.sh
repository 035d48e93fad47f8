#!/usr/bin/env bash
# The Go toolchain and the upstream Go sources the conformance suites are built from
# (moby's graphtest and archive package, containerd's snapshotter testsuite), all from
# Debian's own packages, built in GOPATH mode: no network beyond Debian's archive.
#
#   source scripts/go-env.sh     # installs what is missing, then exports GOPATH & co.
#
# GOPATH: conformance/gopath (our small test programs, and stand-ins for the few moby
# packages Debian does not ship) first, then Debian's /usr/share/gocode.
GO_APT_PACKAGES=(golang-go golang-github-docker-docker-dev golang-github-containerd-containerd-dev
  golang-github-vbatts-tar-split-dev golang-github-gotestyourself-gotest.tools-dev)  # last two: graphtest's imports

_go_missing=()
for _p in "${GO_APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$_p" 2>/dev/null | grep -q "install ok installed" || _go_missing+=("$_p")
done
if ((${#_go_missing[@]})); then
  echo "go-env: installing ${_go_missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${_go_missing[@]}" >/dev/null
fi
unset _go_missing _p

_go_top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export GOPATH="$_go_top/conformance/gopath:/usr/share/gocode"
export GO111MODULE=off
export GOFLAGS=
export GOCACHE="$_go_top/.cache/go-build"
export GO_BIN_DIR="$_go_top/.cache/go-bin"   # where built test binaries go
mkdir -p "$GOCACHE" "$GO_BIN_DIR"
unset _go_top
