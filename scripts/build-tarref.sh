#!/usr/bin/env bash
# Builds the tar reference program (conformance/gopath/src/cvmfsconformance/tarref):
# `tarref DIR` writes exactly the tar stream moby's overlay2 Diff returns for upper dir
# DIR. Built in GOPATH mode from Debian's Go and moby sources (scripts/go-env.sh), into
# $GO_BIN_DIR/tarref. Does nothing when the binary is up to date: a stamp next to it
# records the hash of the program's sources, the Go version and the versions of the
# Debian packages it is built from.
#
#   bash scripts/build-tarref.sh     # prints the binary's path on stdout
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=go-env.sh
source "$top/scripts/go-env.sh"

pkg=cvmfsconformance/tarref
src="$top/conformance/gopath/src/$pkg"
bin="$GO_BIN_DIR/tarref"
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
    sha256sum "$top/scripts/build-tarref.sh" "$top/scripts/go-env.sh"
    go version
    dpkg-query -W -f='${Package} ${Version}\n' "${GO_APT_PACKAGES[@]}"
  } | sha256sum | cut -d' ' -f1
)

if [[ -x "$bin" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "$bin"
  exit 0
fi

echo "build-tarref: building $pkg" >&2
tmp="$bin.tmp.$$"
trap 'rm -f "$tmp"' EXIT
(cd "$src" && go build -trimpath -o "$tmp" "$pkg")
mv -f "$tmp" "$bin"
echo "$want" >"$stamp"
echo "$bin"
