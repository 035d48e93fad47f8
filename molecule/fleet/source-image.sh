#!/usr/bin/env bash
# The fleet scenario's source image, built in the Docker engine at $DOCKER_HOST (the
# controller's) and pushed to the scenario's registry as REGISTRY/fleet/sample:1:
#   base layer  busybox, /etc/sample/{base,gone}.txt, /data/old/file1, and /srv/owned
#               (a directory and a file owned 1234:2345, mode 0750 and 0640)
#   top layer   deletes gone.txt (a whiteout), replaces /data/old by a new directory with
#               file2 (an opaque directory), adds /etc/sample/top.txt owned 4321:5432
#
#   bash molecule/fleet/source-image.sh REGISTRY     # prints the pushed reference
set -euo pipefail
registry=${1:?usage: source-image.sh REGISTRY}
ref=$registry/fleet/sample:1

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
mkdir -p "$root/bin" "$root/etc/sample" "$root/data/old" "$root/srv/owned" "$root/tmp"
chmod 1777 "$root/tmp"
cp /bin/busybox "$root/bin/"
for applet in sh cat ls echo find grep sleep stat rm mkdir chown; do ln -s busybox "$root/bin/$applet"; done
echo "from the base layer" >"$root/etc/sample/base.txt"
echo "deleted by the top layer" >"$root/etc/sample/gone.txt"
echo "hidden by the opaque directory" >"$root/data/old/file1"
echo "owned by 1234:2345" >"$root/srv/owned/file"
chown -R 1234:2345 "$root/srv/owned"
chmod 0750 "$root/srv/owned"
chmod 0640 "$root/srv/owned/file"
tar -C "$root" --numeric-owner -c . | docker import - fleet-sample-base-$$:1 >/dev/null

mkdir "$work/ctx"
cat >"$work/ctx/Dockerfile" <<DOCKERFILE
FROM fleet-sample-base-$$:1
RUN rm /etc/sample/gone.txt && rm -rf /data/old && mkdir /data/old \
 && echo "recreated" > /data/old/file2 && echo "from the top layer" > /etc/sample/top.txt \
 && chown 4321:5432 /etc/sample/top.txt
CMD ["cat", "/etc/sample/base.txt", "/etc/sample/top.txt"]
DOCKERFILE
DOCKER_BUILDKIT=0 docker build -q --network none -t "$ref" "$work/ctx" >/dev/null
docker push -q "$ref" >/dev/null
docker rmi "$ref" fleet-sample-base-$$:1 >/dev/null
echo "$ref"
