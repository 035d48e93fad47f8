#!/usr/bin/env bash
# Runs every test of the project: lint, type check, unit tests, driver tests with real
# overlay mounts, and integration tests against real private dockerds and a registry;
# then the provisioning side (scripts/test-provisioning.sh: the collection's unit tests,
# yamllint, ansible-lint, the collection build and `molecule test`).
# Needs root (mounts, dockerd). Installs what it needs first (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

echo "== lint (ruff) and type check (mypy)"
.venv/bin/ruff check driver
.venv/bin/ruff check --config driver/pyproject.toml bench
(cd driver && ../.venv/bin/mypy)

echo "== driver tests (pytest)"
(cd driver && ../.venv/bin/python -m pytest "$@")

echo "== moby graphtest (moby's graph-driver conformance suite against the plugin)"
bash scripts/graphtest.sh

echo "== containerd snapshotter conformance (containerd's snapshots/testsuite against the snapshotter)"
bash scripts/snapshotsuite.sh

echo "== benchmark suite, quick mode (proves bench/compare.py runs: any failed operation fails it; its figures are not judged here)"
bench_out=$(mktemp -d /tmp/bench-quick.XXXXXX)
.venv/bin/python bench/compare.py --quick --out "$bench_out"

bash scripts/test-provisioning.sh
