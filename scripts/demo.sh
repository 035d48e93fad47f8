#!/usr/bin/env bash
# The main job, end to end on this machine (as root, Debian 12):
#   1. a local worker node: a Debian 12 container running systemd, in a private dockerd
#      (scripts/molecule-dockerd.sh), built locally (scripts/node-image.sh: debootstrap);
#   2. `ansible-playbook site.yml` provisions it: overlayfs, CVMFS client configuration,
#      the cvmfs-graphdriver daemon (wheel built here, socket-activated), Docker 20.10 on
#      the `cvmfs` storage driver;
#   3. playbooks/verify.yml health-checks it and runs a regular (busybox) image;
#   4. a thin image: cvmfs-thin publishes a two-layer image into the repository
#      thin.example.org on a CernVM-FS stratum 0 on this machine (scripts/cvmfs.sh: the
#      packages from ../shared/cvmfs where CERN's repository is unreachable); site.yml
#      gave the node a real CVMFS client of it, which fetches the files the thin image's
#      container reads. Where no CernVM-FS can be installed (scripts/cvmfs.sh source says
#      none) the demo says so loudly and copies the published tree to the node's
#      /cvmfs/thin.example.org instead;
#   and prints what happened. The node is removed at the end unless --keep is given.
#
#   bash scripts/demo.sh [--keep]
set -euo pipefail
cd "$(dirname "$0")/.."

KEEP=
[[ ${1:-} == --keep ]] && KEEP=1
NODE=cvmfs-graphdriver-demo-node
IMAGE=${NODE_IMAGE:-cvmfs-graphdriver/node:debian12}
WORK=.cache/demo

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
REPO=thin.example.org
THIN=$REPO/sample:1
CVMFS_FROM=$(bash scripts/cvmfs.sh source)
CVMFS_DEBS=$(bash scripts/cvmfs.sh debs)
export CVMFS_DEBS

say "private dockerd for the worker node"
started_dockerd=
if ! bash scripts/molecule-dockerd.sh status >/dev/null 2>&1; then
  bash scripts/molecule-dockerd.sh start
  started_dockerd=1
fi
eval "$(bash scripts/molecule-dockerd.sh env)"
cleanup() {
  if [[ -z $KEEP ]]; then
    docker rm -f "$NODE" >/dev/null 2>&1 || true
    [[ -n $started_dockerd ]] && bash scripts/molecule-dockerd.sh stop
  fi
  true
}
trap cleanup EXIT

say "worker node image (debootstrap'd Debian 12 with systemd; cached in .cache/node-image)"
bash scripts/node-image.sh

say "start the worker node $NODE (systemd as PID 1)"
docker rm -f "$NODE" >/dev/null 2>&1 || true
mkdir -p .cache/node-apt-archives "$WORK"
caps=(AUDIT_CONTROL AUDIT_READ AUDIT_WRITE BLOCK_SUSPEND CHOWN DAC_OVERRIDE DAC_READ_SEARCH
  FOWNER FSETID IPC_LOCK IPC_OWNER KILL LEASE LINUX_IMMUTABLE MAC_ADMIN MAC_OVERRIDE MKNOD
  NET_ADMIN NET_BIND_SERVICE NET_BROADCAST NET_RAW SETFCAP SETGID SETPCAP SETUID SYSLOG
  SYS_ADMIN SYS_BOOT SYS_CHROOT SYS_MODULE SYS_NICE SYS_PACCT SYS_PTRACE SYS_RAWIO SYS_TIME
  SYS_TTY_CONFIG WAKE_ALARM)   # --privileged fails here (no CAP_SYS_RESOURCE)
docker run -d --name "$NODE" --hostname "$NODE" "${caps[@]/#/--cap-add=}" \
  --security-opt seccomp=unconfined --security-opt apparmor=unconfined \
  --security-opt systempaths=unconfined \
  --cgroupns=host -v /sys/fs/cgroup:/sys/fs/cgroup:rw \
  --tmpfs /run --tmpfs /run/lock --tmpfs /tmp \
  -v /var/lib/docker -v /cvmfs -v /var/lib/cvmfs --device /dev/fuse \
  -v "$PWD/.cache/node-apt-archives:/var/cache/apt/archives" \
  --network host "$IMAGE" >/dev/null
state=
for _ in $(seq 1 60); do   # until systemd answers on its bus
  state=$(docker exec "$NODE" systemctl is-system-running --wait 2>/dev/null) || true
  [[ -n $state ]] && break
  sleep 1
done
echo "systemd in $NODE: ${state:-not answering}"
[[ $state == running || $state == degraded ]] || { docker logs "$NODE" | tail -20; exit 1; }

if [[ $CVMFS_FROM != none ]]; then
  say "the repository's stratum 0 on this machine, and the sample thin image published into it"
  bash scripts/cvmfs.sh stratum0 "$REPO"
  SAMPLE_STORE=cvmfs bash scripts/sample-thin-image.sh "$WORK/thin" "$REPO" "$THIN"
fi

# The node's inventory (JSON is YAML): the real client from the source scripts/cvmfs.sh
# decided, reading the stratum 0 on 127.0.0.1 (the node shares this machine's network).
python3 - "$NODE" "$REPO" "$CVMFS_FROM" >"$WORK/inventory.yml" <<'PY'
import glob, json, os, sys
node, repo, source = sys.argv[1:]
workers = {
    "cvmfs_client_repositories": [repo],
    # The node shares this machine's network namespace: no docker0, no iptables.
    "docker_engine_bridge": "none",
    "docker_engine_iptables": False,
    # Thin images from the repository the sample is published into.
    "graphdriver_cvmfs_root": "/cvmfs",
    "graphdriver_repositories": [repo],
    "verify_image": "busybox:demo",
    "verify_pull": False,
}
if source == "none":
    workers["cvmfs_client_package_source"] = "none"  # configuration only
else:
    debs = os.environ["CVMFS_DEBS"]  # scripts/cvmfs.sh debs
    files = [f for pat in ("cvmfs-config-none_*", "cvmfs-libs_*", "cvmfs_*", "cvmfs-fuse3_*")
             for f in sorted(glob.glob(os.path.join(debs, pat + ".deb")))]
    with open(f"/etc/cvmfs/keys/{repo}.pub") as f:
        key = f.read()
    workers.update({
        "cvmfs_client_package_source": source,
        "cvmfs_client_package_files": files,
        "cvmfs_client_autofs": False,  # no autofs in the node: mounted through /etc/fstab
        "cvmfs_client_http_proxies": ["DIRECT"],  # one node; a site has squids
        "cvmfs_client_params": {"CVMFS_USE_GEOAPI": "no", "CVMFS_NFILES": "16384"},
        "cvmfs_client_domains": [{
            "domain": repo.split(".", 1)[1],
            "server_urls": ["http://127.0.0.1/cvmfs/@fqrn@"],
            "public_keys": [{"name": f"{repo}.pub", "content": key}],
        }],
        # A repository of image layers: files keep the image's owners.
        "cvmfs_client_repository_configs": [
            {"repository": repo, "params": {"CVMFS_CLAIM_OWNERSHIP": "no"}}],
    })
print("# Written by scripts/demo.sh: the local worker node, reached with docker exec.")
print(json.dumps({"all": {"children": {"workers": {
    "hosts": {node: {"ansible_connection": "community.docker.docker"}},
    "vars": workers}}}}, indent=2))
PY

say "ansible-playbook site.yml (provision the worker node)"
start=$(date +%s)
ansible-playbook -i "$WORK/inventory.yml" site.yml | tee "$WORK/converge.log"
converge_s=$(( $(date +%s) - start ))

say "a regular image on the node: busybox from this machine's busybox-static, docker import"
tmp=$(mktemp -d)
mkdir -p "$tmp/bin" && cp /bin/busybox "$tmp/bin/"
for applet in sh cat echo ls grep cut hostname sleep; do ln -s busybox "$tmp/bin/$applet"; done
tar -C "$tmp" -c . | docker exec -i "$NODE" docker import -c 'CMD ["sh"]' - busybox:demo
rm -rf "$tmp"

say "playbooks/verify.yml (health check and a test container)"
ansible-playbook -i "$WORK/inventory.yml" playbooks/verify.yml | tee "$WORK/verify.log"

say "the thin image on the node"
if [[ $CVMFS_FROM == none ]]; then
  echo "NO REAL CERNVM-FS here (scripts/cvmfs.sh source: none): the published tree is copied" >&2
  echo "to the node's /cvmfs/$REPO, standing in for its CVMFS client" >&2
  bash scripts/sample-thin-image.sh "$WORK/thin" "$REPO" "$THIN"
  docker exec "$NODE" mkdir -p "/cvmfs/$REPO"
  docker exec -i "$NODE" tar -C "/cvmfs/$REPO" -x <"$WORK/thin/repository.tar"
fi
docker exec -i "$NODE" docker load <"$WORK/thin/thin-image.tar"
thin_bytes=$(docker exec "$NODE" docker image inspect --format '{{.Size}}' "$THIN")
thin_out=$(docker exec "$NODE" docker run --rm --network none "$THIN" sh -c \
  'cat /etc/sample/base.txt /etc/sample/top.txt; echo "ls /etc/sample:" $(ls /etc/sample)')

cvmfs_summary() {
  if [[ $CVMFS_FROM == none ]]; then
    echo "CernVM-FS:        none installable here: a copied tree stood in for the client"
    return
  fi
  local rx n
  rx=$(docker exec "$NODE" cvmfs_talk -i "$REPO" internal affairs 2>/dev/null \
    | sed -n 's/^download\.sz_transferred_bytes|\([0-9]*\)|.*/\1/p' | head -1)
  n=$(docker exec "$NODE" cvmfs_talk -i "$REPO" internal affairs 2>/dev/null \
    | sed -n 's/^download\.n_requests|\([0-9]*\)|.*/\1/p' | head -1)
  echo "CernVM-FS:        $(docker exec "$NODE" cvmfs2 --version 2>&1 | head -1) client ($CVMFS_FROM), $REPO from the stratum 0 on 127.0.0.1:"
  echo "                  ${n:-?} downloads, ${rx:-?} bytes fetched in all"
}

say "what happened"
run_out=$(docker exec "$NODE" docker run --rm --network none busybox:demo \
  sh -c 'echo "hello from a container on $(hostname)"; grep " / " /proc/mounts')
recap=$(grep -A1 "PLAY RECAP" "$WORK/converge.log" | tail -1 | tr -s ' ')
cat <<SUMMARY
worker node:      $NODE (Debian 12, systemd $state), provisioned by site.yml in ${converge_s} s
                  ${recap}
docker:           $(docker exec "$NODE" docker info --format '{{.ServerVersion}}, storage driver {{.Driver}}')
driver units:     $(docker exec "$NODE" systemctl is-active cvmfs-graphdriver.socket cvmfs-graphdriver.service | paste -sd' ') (socket, service)
driver config:    $(docker exec "$NODE" /opt/cvmfs-graphdriver/bin/cvmfs-graphdriver show-config | paste -sd' ')
daemon.json:      $(docker exec "$NODE" cat /etc/docker/daemon.json | tr -d ' \n')
regular image:    busybox:demo ->
$(sed 's/^/                  /' <<<"$run_out")
thin image:       $THIN, ${thin_bytes} bytes on the node; layers read from /cvmfs/thin.example.org ->
$(sed 's/^/                  /' <<<"$thin_out")
repositories:     $(docker exec "$NODE" docker info --format '{{range .DriverStatus}}{{if eq (index . 0) "Repository thin.example.org"}}{{index . 1}}{{end}}{{end}}')
$(cvmfs_summary)
SUMMARY
if [[ -n $KEEP ]]; then
  echo
  echo "The node keeps running: DOCKER_HOST=$DOCKER_HOST docker exec -it $NODE bash"
  echo "Remove it with: DOCKER_HOST=$DOCKER_HOST docker rm -f $NODE; bash scripts/molecule-dockerd.sh stop"
fi
