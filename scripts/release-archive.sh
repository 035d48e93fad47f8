#!/usr/bin/env bash
# Writes what a site runs of a release - site.yml, ansible.cfg, the collection (roles/ is
# its link), playbooks/ and the driver's sources its graphdriver role builds - from the
# release's git tag into a reproducible tar.gz (git archive's fixed mtimes, gzip -n).
# molecule/upgrade provisions its node with the previous release from that file: git
# tags do not travel with every clone (CI's fresh clone of main has none), files do.
#   bash scripts/release-archive.sh v0.1.0    # writes molecule/upgrade/releases/v0.1.0.tar.gz
# Then put the printed sha256 into molecule/upgrade/prepare.yml (upgrade_release_sha256).
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:?usage: scripts/release-archive.sh TAG [OUT]}
out=${2:-molecule/upgrade/releases/$tag.tar.gz}

if ! commit=$(git rev-parse --verify --quiet "refs/tags/$tag^{commit}"); then
    echo "release-archive: no git tag $tag in $(pwd): fetch it (git fetch --tags origin) or name a release that has one (git tag)" >&2
    exit 1
fi

mkdir -p "$(dirname "$out")"
tmp=$(mktemp "$out.XXXXXX")
trap 'rm -f "$tmp"' EXIT
git archive --format=tar "$commit" -- \
    site.yml ansible.cfg collections roles playbooks \
    driver/pyproject.toml driver/README.md driver/src \
    | gzip -n -9 > "$tmp"
chmod 0644 "$tmp"
mv "$tmp" "$out"
trap - EXIT
echo "release-archive: $tag ($commit) -> $out"
sha256sum "$out"
