#!/usr/bin/env bash
# Builds the driver's wheel on the controller, the package the graphdriver role deploys
# (graphdriver_package_file): dist/cvmfs_graphdriver-VERSION-py3-none-any.whl at the
# repository root, or in OUTDIR. playbooks/build.yml (the first play of site.yml) runs
# it; run it by hand to build a wheel for another inventory.
#
#   bash scripts/build-wheel.sh [OUTDIR]     # prints the wheel's path
#
# The build is reproducible (a copy of driver/'s package files, a fixed
# SOURCE_DATE_EPOCH), so the same sources give the same bytes, and a wheel already in
# OUTDIR with those bytes is left untouched: nothing changes on the nodes on a second
# run. Other cvmfs_graphdriver-*.whl files in OUTDIR are removed, so it holds exactly one.
# The last line of the output says "unchanged" or "built" (playbooks/build.yml reads it).
# PYTHON: the Python that builds (needs pip and setuptools >= 77; default: .venv's, else
# python3). Nothing is downloaded (pip --no-index --no-build-isolation).
set -euo pipefail
# The wheel records its files' modes, which pip gives the ones it generates (METADATA,
# RECORD, ...) from the umask: fixed, so the bytes do not depend on who builds.
umask 022
root=$(cd "$(dirname "$0")/.." && pwd)
outdir=${1:-$root/dist}
python=${PYTHON:-}
if [[ -z $python ]]; then
  if [[ -x $root/.venv/bin/python ]]; then python=$root/.venv/bin/python; else python=python3; fi
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/cvmfs-graphdriver-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT

# A copy of the package files only: a build in place would leave build/ and egg-info in
# the checkout, and caches (__pycache__) are not part of the package.
mkdir -p "$work/src"
cp "$root/driver/pyproject.toml" "$root/driver/README.md" "$work/src/"
tar -C "$root/driver" --exclude=__pycache__ --exclude='*.pyc' -cf - src | tar -C "$work/src" -xf -

if ! SOURCE_DATE_EPOCH=315532800 PIP_DISABLE_PIP_VERSION_CHECK=1 "$python" -m pip wheel \
    --quiet --no-deps --no-index --no-build-isolation --wheel-dir "$work/dist" "$work/src" >&2; then
  echo "build-wheel: building the driver's wheel with $python failed (see above); it needs" \
    "pip and setuptools >= 77 (bash scripts/setup.sh installs them in .venv)" >&2
  exit 1
fi
built=("$work"/dist/cvmfs_graphdriver-*.whl)
if [[ ${#built[@]} -ne 1 || ! -f ${built[0]} ]]; then
  echo "build-wheel: expected one cvmfs_graphdriver-*.whl from pip wheel, found: ${built[*]}" >&2
  exit 1
fi
name=$(basename "${built[0]}")

mkdir -p "$outdir"
target=$outdir/$name
if [[ -f $target ]] && cmp -s "${built[0]}" "$target"; then
  state=unchanged
else
  # Next to the target first, then renamed: never a half-written wheel under its name.
  cp "${built[0]}" "$outdir/.$name.tmp"
  mv -f "$outdir/.$name.tmp" "$target"
  state=built
fi
for old in "$outdir"/cvmfs_graphdriver-*.whl; do
  [[ $old == "$target" ]] || { rm -f "$old"; state=built; }
done
echo "$target"
echo "$state"
