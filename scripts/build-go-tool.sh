#!/usr/bin/env bash
# Builds one of the small Go programs the tests use, from
# conformance/gopath/src/cvmfsconformance/NAME, in GOPATH mode from Debian's Go, moby
# and containerd sources (scripts/go-env.sh), into $GO_BIN_DIR/NAME:
#   tarref    `tarref DIR` writes exactly the tar stream moby's overlay2 Diff returns for
#             upper dir DIR (the byte-identity tests' reference)
#   lazypull  pulls an image into containerd with the remote-snapshotter annotations,
#             as Docker >= 24, nerdctl and the CRI do (the lazy-pull tests)
# Does nothing when the binary is up to date: a stamp next to it records the hash of the
# program's sources, the Go version and the versions of the Debian packages it is built
# from.
#
#   bash scripts/build-go-tool.sh NAME     # prints the binary's path on stdout
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=go-env.sh
source "$top/scripts/go-env.sh"

name=${1:?usage: build-go-tool.sh NAME (tarref, lazypull)}
pkg=cvmfsconformance/$name
src="$top/conformance/gopath/src/$pkg"
[[ -d $src ]] || { echo "build-go-tool: no program $name in $src" >&2; exit 2; }
bin="$GO_BIN_DIR/$name"
stamp="$bin.stamp"

# Everything the binary depends on: the packages it imports from conformance/gopath
# (tarref itself and any stand-ins), this script, the toolchain and Debian's sources.
want=$(
  {
    go list -deps -f '{{if not .Standard}}{{.Dir}}{{end}}' "$pkg" |
      while read -r dir; do
        [[ "$dir" == "$top/conformance/"* ]] || continue
        find "$dir" -maxdepth 1 -name '*.go' -not -name '*_test.go' | sort | xargs sha256sum
      done
    sha256sum "$top/scripts/build-go-tool.sh" "$top/scripts/go-env.sh"
    go version
    dpkg-query -W -f='${Package} ${Version}\n' "${GO_APT_PACKAGES[@]}"
  } | sha256sum | cut -d' ' -f1
)

if [[ -x "$bin" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "$bin"
  exit 0
fi

echo "build-go-tool: building $pkg" >&2
tmp="$bin.tmp.$$"
trap 'rm -f "$tmp"' EXIT
(cd "$src" && go build -trimpath -o "$tmp" "$pkg")
mv -f "$tmp" "$bin"
echo "$want" >"$stamp"
echo "$bin"
