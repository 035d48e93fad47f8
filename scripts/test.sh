#!/usr/bin/env bash
# Runs every test of the project: lint, type check, unit tests, driver tests with real
# overlay mounts, and integration tests against real private dockerds and a registry.
# Needs root (mounts, dockerd). Installs what it needs first (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

echo "== lint (ruff) and type check (mypy)"
.venv/bin/ruff check driver
(cd driver && ../.venv/bin/mypy)

echo "== driver tests (pytest)"
cd driver
exec ../.venv/bin/python -m pytest "$@"
