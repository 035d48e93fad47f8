#!/usr/bin/env bash
# Publishes a sample thin image with cvmfs-thin, for the Molecule scenario and the demo.
#
#   bash scripts/sample-thin-image.sh OUTDIR [REPOSITORY] [THIN_TAG]
#
# In the Docker engine at $DOCKER_HOST: imports a busybox base layer, builds a second
# layer that deletes a file and a directory and recreates the directory (whiteouts and
# an opaque directory), converts the image with `cvmfs-thin convert --store dir:...`
# into OUTDIR/store/REPOSITORY (a repository tree, as a CVMFS publisher would hold it),
# and leaves OUTDIR/repository.tar (that tree) and OUTDIR/thin-image.tar (docker save of
# the thin image). A worker node gets the tree at /cvmfs/REPOSITORY and loads the image.
#
# With SAMPLE_REGISTRY=HOST:PORT the source image is also pushed there as
# HOST:PORT/sample:1 and converted from that reference with --digests registry, so its
# layers sit where containerd's lazy pulls look for them (the registry's compressed
# digests): a node pulling HOST:PORT/sample:1 through the snapshotter downloads none of
# them. OUTDIR/layers.txt then lists those digests.
#
# With SAMPLE_STORE=cvmfs the layers go into the real repository REPOSITORY instead
# (`cvmfs-thin convert --store cvmfs:REPOSITORY`, on its stratum 0: scripts/cvmfs.sh
# stratum0), and OUTDIR/repository.tar is not made.
set -euo pipefail
out=${1:?usage: sample-thin-image.sh OUTDIR [REPOSITORY] [THIN_TAG]}
repo=${2:-thin.example.org}
tag=${3:-thin.example.org/sample:1}
top=$(cd "$(dirname "$0")/.." && pwd)
cvmfs_thin=${CVMFS_THIN:-$top/.venv/bin/cvmfs-thin}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
mkdir -p "$root/bin" "$root/etc/sample" "$root/data/old" "$root/tmp"
chmod 1777 "$root/tmp"
cp /bin/busybox "$root/bin/"
for applet in sh cat ls echo find grep sleep; do ln -s busybox "$root/bin/$applet"; done
echo "from the base layer" >"$root/etc/sample/base.txt"
echo "deleted by the top layer" >"$root/etc/sample/gone.txt"
echo "hidden by the opaque directory" >"$root/data/old/file1"
tar -C "$root" --numeric-owner -c . | docker import - sample-thin-base:1 >/dev/null

mkdir "$work/ctx"
cat >"$work/ctx/Dockerfile" <<'DOCKERFILE'
FROM sample-thin-base:1
RUN rm /etc/sample/gone.txt && rm -rf /data/old && mkdir /data/old \
 && echo "recreated" > /data/old/file2 && echo "from the top layer" > /etc/sample/top.txt
CMD ["cat", "/etc/sample/base.txt", "/etc/sample/top.txt"]
DOCKERFILE
DOCKER_BUILDKIT=0 docker build -q --network none -t sample-thin-source:1 "$work/ctx" >/dev/null

source_ref=sample-thin-source:1
digests=()
if [[ -n ${SAMPLE_REGISTRY:-} ]]; then
  source_ref=$SAMPLE_REGISTRY/sample:1
  docker tag sample-thin-source:1 "$source_ref"
  docker push -q "$source_ref" >/dev/null
  digests=(--digests registry)
fi

if [[ ${SAMPLE_STORE:-dir} == cvmfs ]]; then
  mkdir -p "$out"
  "$cvmfs_thin" convert "$source_ref" --store "cvmfs:$repo" --tag "$tag" "${digests[@]}"
  docker save -o "$out/thin-image.tar" "$tag"
  docker rmi "$tag" sample-thin-source:1 sample-thin-base:1 >/dev/null
  exit 0
fi
rm -rf "$out/store/$repo"
mkdir -p "$out/store/$repo"
"$cvmfs_thin" convert "$source_ref" --store "dir:$out/store/$repo" --repo "$repo" \
  --tag "$tag" "${digests[@]}"
if [[ -n ${SAMPLE_REGISTRY:-} ]]; then
  # The registry's layer digests, as the store holds them (what the node must not fetch).
  (cd "$out/store/$repo/.layers" && ls -d ./*/* | sed 's|^\./../|sha256:|') >"$out/layers.txt"
  docker rmi "$source_ref" >/dev/null
fi
tar -C "$out/store/$repo" --numeric-owner -cf "$out/repository.tar" .
docker save -o "$out/thin-image.tar" "$tag"
docker rmi "$tag" sample-thin-source:1 sample-thin-base:1 >/dev/null
