#!/usr/bin/env bash
# Tests of the provisioning side: the collection's unit tests, yamllint, ansible-lint
# (production profile), the collection build, and `molecule test` of the default
# (graph-driver plugin, Debian 12), snapshotter (containerd store, Debian 13), fleet
# (a stratum 0 and two workers with the real CVMFS client) and upgrade (the previous
# release, v0.1.0 from molecule/upgrade/releases/, then this checkout) scenarios on a
# private dockerd (scripts/molecule-dockerd.sh, started here and stopped afterwards
# when this script started it). Needs root. scripts/test.sh runs it after the driver
# tests; run it alone after scripts/setup.sh for the Ansible side only.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"

passed=0
stage() { echo; echo "== $*"; }
done_stage() { passed=$((passed + 1)); }

stage "collection unit tests (pytest)"
python -m pytest -q -p no:cacheprovider collections/ansible_collections/cvmfs_graphdriver/provisioning/tests/unit
done_stage

stage "ruff (the module, its tests, the testinfra tests, scripts)"
ruff check --select E,F,W,I,B,UP,SIM --ignore E402 --line-length 110 --target-version py39 \
  collections molecule scripts/role-docs.py   # E402: Ansible modules import after DOCUMENTATION
done_stage

stage "role variables: argument_specs.yml, defaults/main.yml and READMEs agree"
python scripts/role-docs.py --check
done_stage

stage "yamllint"
yamllint -s .
done_stage

stage "ansible-lint --profile production"
ansible-lint --profile production
done_stage

stage "ansible-galaxy collection build (artifact must include the roles)"
out=$(mktemp -d)
ansible-galaxy collection build collections/ansible_collections/cvmfs_graphdriver/provisioning \
  --output-path "$out" >/dev/null
listing=$(tar -tzf "$out"/cvmfs_graphdriver-provisioning-*.tar.gz)
for f in plugins/modules/docker_daemon_json.py plugins/modules/containerd_proxy_plugin.py \
    roles/overlay/tasks/main.yml \
    roles/cvmfs_client/tasks/main.yml roles/docker_engine/tasks/main.yml \
    roles/graphdriver/tasks/main.yml roles/graphdriver/meta/argument_specs.yml \
    roles/publisher/tasks/main.yml roles/publisher/meta/argument_specs.yml; do
  grep -qx "$f" <<<"$listing" || { echo "collection artifact lacks $f" >&2; exit 1; }
done
echo "built $(basename "$out"/*.tar.gz) with the modules and the five roles"
rm -rf "$out"
done_stage

started_dockerd=
if ! bash scripts/molecule-dockerd.sh status >/dev/null 2>&1; then
  bash scripts/molecule-dockerd.sh start
  started_dockerd=1
fi
cleanup() { [[ -n $started_dockerd ]] && bash scripts/molecule-dockerd.sh stop; true; }
trap cleanup EXIT
eval "$(bash scripts/molecule-dockerd.sh env)"

stage "molecule test (default scenario: Debian 12 node, graph-driver plugin; converge, idempotence, verify)"
bash scripts/node-image.sh >/dev/null
mkdir -p .cache/node-apt-archives
start=$(date +%s)
molecule test -s default
echo "molecule test -s default took $(( $(date +%s) - start )) s"
done_stage

stage "molecule test (snapshotter scenario: Debian 13 node, Docker 26 on the containerd store; lazy pull, thin image, restart)"
NODE_SUITE=trixie bash scripts/node-image.sh >/dev/null
mkdir -p .cache/node13-apt-archives
start=$(date +%s)
molecule test -s snapshotter
echo "molecule test -s snapshotter took $(( $(date +%s) - start )) s"
done_stage

stage "molecule test (fleet scenario: a stratum 0 + squid publisher and two Debian 12 workers with the real CVMFS client, rolling converge)"
# The fleet needs a real CVMFS (client and cvmfs-server): the source scripts/cvmfs.sh
# decides for the driver's tests (prepare.yml refuses none).
CVMFS_DEBS=$(bash scripts/cvmfs.sh debs)
export CVMFS_DEBS
FLEET_CVMFS_SOURCE=$(bash scripts/cvmfs.sh source)
export FLEET_CVMFS_SOURCE
start=$(date +%s)
molecule test -s fleet
echo "molecule test -s fleet took $(( $(date +%s) - start )) s"
done_stage

stage "molecule test (upgrade scenario: the previous release v0.1.0, then this checkout, on a node with running containers)"
start=$(date +%s)
molecule test -s upgrade
echo "molecule test -s upgrade took $(( $(date +%s) - start )) s"
done_stage

echo
echo "provisioning: $passed passed, 0 failed"
